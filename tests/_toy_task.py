"""A toy task, as a newcomer would add one: this file and its one registration line.

It fits ``y = w x + b`` to numbers read from a JSONL file with the shared engine.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from lmforge.config import RunConfig, Section
from lmforge.data.readers import read_table
from lmforge.device import Placement
from lmforge.rundir import open_run, write_json, write_safetensors
from lmforge.tasks.base import Task, register_task


class ToySection(Section):
    init: float = Field(0.0, description="starting weight")


class ToyRun(RunConfig):
    task: Literal["toy"] = "toy"
    toy: ToySection = Field(default_factory=ToySection)


@register_task("toy", config=ToyRun)
class ToyTask(Task):
    def __init__(self, cfg: ToyRun, with_data: bool = True):
        self.cfg, self.placement = cfg, Placement.resolve("cpu", "fp32")
        self.model = torch.nn.Linear(1, 1)
        torch.nn.init.constant_(self.model.weight, cfg.toy.init)
        torch.nn.init.zeros_(self.model.bias)
        rows = read_table(cfg.data.train).records if with_data else []
        self.train_items = [{"x": float(r["x"]), "y": float(r["y"])} for r in rows]
        self.eval_items = self.train_items[:4]

    def item_length(self, item):
        return 1

    def collate(self, items):
        return {"x": torch.tensor([[it["x"]] for it in items]), "y": torch.tensor([[it["y"]] for it in items])}

    def batch_units(self, batch):
        return int(batch["x"].shape[0])

    def batch_tokens(self, batch):
        return int(batch["x"].shape[0])

    def loss(self, batch):
        return torch.nn.functional.mse_loss(self.model(batch["x"]), batch["y"]), {}

    def evaluate(self, items=None):
        b = self.collate(list(self.eval_items if items is None else items))
        return {"mse": float(torch.nn.functional.mse_loss(self.model(b["x"]), b["y"]))}

    def save(self, out_dir: Path) -> None:
        write_safetensors(Path(out_dir) / "toy.safetensors", dict(self.model.state_dict()))
        write_json(Path(out_dir) / "toy.json", {"w": float(self.model.weight.detach())})

    @classmethod
    def from_run(cls, run_dir, which="final"):
        from safetensors.torch import load_file

        opened = open_run(run_dir, which)
        task = cls(opened.config, with_data=False)
        task.model.load_state_dict(load_file(str(opened.file("toy.safetensors"))))
        return task

    def predict(self, texts):
        with torch.no_grad():
            return [{"text": t, "y": float(self.model(torch.tensor([[float(t)]])))} for t in texts]
