"""The task protocol (what a task gives the engine and its callers) and the one task registry.

A task is one module ``tasks/<x>.py`` with one registration line on its class::

    @register_task("x", config=XRun)      # binds the name, the config class (section ``x:``) and the class
    class XTask(Task): ...

and, for a task shipped with lmforge, its module in ``TASK_MODULES`` (``tasks/__init__.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..config import TASK_CONFIGS, RunConfig
from ..device import Placement

#: task name -> task class (filled by :func:`register_task`)
TASKS: dict[str, type["Task"]] = {}


def register_task(name: str, config: type[RunConfig]) -> Callable[[type], type]:
    """Class decorator: register a task under ``name`` with its RunConfig subclass.

    The config class is what ``task: <name>`` recipes validate into (its own section is usually
    named after the task); the class is what :func:`lmforge.tasks.task_class` returns.
    """
    if not (isinstance(config, type) and issubclass(config, RunConfig)):
        raise TypeError(f"register_task('{name}'): config must be a RunConfig subclass")

    def deco(cls: type) -> type:
        cls.name = name
        cls.config_class = config
        TASKS[name] = cls
        TASK_CONFIGS[name] = config
        return cls

    return deco


class Task:
    """A task owns the model and the data; the engine owns the loop.

    Subclasses set ``self.model``, ``self.train_items`` (a list of tokenised examples) and
    implement :meth:`collate`, :meth:`loss` and :meth:`evaluate`. ``self.model`` may be
    replaced by a DDP wrapper while training; use it for forward passes.
    """

    name = "task"
    config_class: type[RunConfig] = RunConfig
    cfg: RunConfig
    placement: Placement
    model: nn.Module
    train_items: Sequence[dict] = ()
    eval_items: Sequence[dict] = ()

    def item_length(self, item: dict) -> int:
        """Length used for length-grouped batching."""
        return len(item["input_ids"])

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def batch_units(self, batch: dict) -> int:
        """How many loss units (samples by default; tokens for LM losses) the batch holds.

        The engine weighs micro-batches by their units so gradient accumulation and DDP give
        the same gradient as one big batch.
        """
        return int(batch["input_ids"].shape[0])

    def batch_tokens(self, batch: dict) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss over the batch's units, plus metrics to log."""
        raise NotImplementedError

    def evaluate(self, items: Sequence[dict] | None = None) -> dict[str, Any]:
        """Metrics on ``items`` (default: the eval data; the engine logs them and tracks the best)."""
        return {}

    def save(self, out_dir: Path) -> None:
        """Write the trained artefact (adapter folder or model folder) into ``out_dir``."""
        raise NotImplementedError

    # ---- choosing the class and reloading a finished run ------------------------------------
    @classmethod
    def for_config(cls, cfg: RunConfig) -> type["Task"]:
        """The class that runs ``cfg`` (a task with several methods dispatches here)."""
        return cls

    @classmethod
    def from_run(cls, run_dir: str | Path, which: str = "final") -> "Task":
        """The task of a finished run, ready to evaluate/predict (``which``: final, best)."""
        from ..errors import LmforgeError

        raise LmforgeError(f"{run_dir}: {cls.name} runs cannot be reloaded")

    def read_eval_file(self, path: str) -> list[dict]:
        """Items of an evaluation file, for :meth:`evaluate`."""
        from ..errors import LmforgeError

        raise LmforgeError(f"{path}: {self.name} runs have no file evaluation (lmforge eval --task ...)")

    def predict_file(self, path: str, out: str) -> int:
        """Predict every record of ``path`` into ``out`` (JSONL); returns the count."""
        from ..errors import LmforgeError

        raise LmforgeError(f"{self.name} runs do not predict files; predict takes classify, ner and embed runs "
                           "(causal LM runs: lmforge generate RUN_DIR --input FILE --out FILE; reward runs: "
                           "lmforge score RUN_DIR --input FILE)")

    def predict(self, texts: Sequence[str]) -> list[dict]:
        """Predictions for raw texts, one dict per text (label, score ...)."""
        from ..errors import LmforgeError

        raise LmforgeError(f"{self.name} runs do not predict texts")

    def describe_model(self) -> str:
        """One line about the trained parameters (logged when training starts)."""
        return self.describe()

    # ---- on-policy tasks (rl): the engine trains in rollout phases -----------------------------
    #: True for tasks that make their own training data with the current model (see :meth:`rollout`)
    on_policy = False

    def rollout_plan(self) -> tuple[int, int, int]:
        """(samples per rollout, rollouts per epoch of prompts, optimisation epochs per rollout)."""
        raise NotImplementedError

    def rollout(self, phase: int) -> dict[str, Any]:
        """Rollout ``phase`` (model in eval mode, no gradients): ``{"items": [...], "metrics": {...},
        "samples": [...]}``; items are what :meth:`collate` takes, metrics are logged with every
        step of the phase, samples (dicts) go to the run's ``samples/`` folder."""
        raise NotImplementedError

    def loop_state(self) -> dict[str, Any]:
        """JSON state the task carries across steps (saved in checkpoints, e.g. a KL coefficient)."""
        return {}

    def load_loop_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`loop_state` on resume."""

    def train_direct(self, run_dir: Path) -> dict[str, Any] | None:
        """Methods that train without gradient steps (e.g. embeddings + logistic regression)
        override this and return their eval metrics; the default (None) means: use the engine."""
        return None

    def describe(self) -> str:
        return self.name
