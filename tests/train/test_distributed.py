"""DDP under torchrun (gloo, CPU): 2 processes give the same weights as 1 process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sentiment_rows, write_jsonl, write_yaml
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.train.distributed import DistEnv, all_sum, shard

WORKER = Path(__file__).with_name("_ddp_worker.py")


def test_shard_and_single_process_helpers():
    assert shard([0, 1, 2, 3, 4, 5, 6, 7], DistEnv(rank=0, world=2)) == [0, 1, 2, 3]
    assert shard([0, 1, 2, 3, 4, 5, 6, 7], DistEnv(rank=1, world=2)) == [4, 5, 6, 7]
    assert shard([0, 1, 2], DistEnv()) == [0, 1, 2]
    assert all_sum(2.5, DistEnv(), torch.device("cpu")) == 2.5
    assert DistEnv().is_main and not DistEnv().enabled


def _recipe(tmp_path: Path, model_dir: Path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(48, seed=21))
    write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(12, seed=22))
    return write_yaml(tmp_path / "r.yaml", {
        "task": "classify", "output_dir": str(tmp_path / "runs"), "seed": 3,
        "model": {"name": str(model_dir), "precision": "fp32", "device": "cpu"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
        "classify": {"mode": "full"},
        "train": {"max_steps": 3, "grad_accum": 2, "lr": 3e-3, "warmup_ratio": 0.3, "log_every": 1,
                  "eval_every": 2, "save_every": 2, "progress": False}})


@pytest.mark.distributed
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_bert_dir):
    recipe = _recipe(tmp_path, tiny_bert_dir)   # tiny BERT: dropout 0; fp32; global batch 8 x 2 accumulated
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the conftest's offline + cache settings pass through
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), "train", str(recipe), "name=ddp", "train.batch_size=4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert main(["train", str(recipe), "name=single", "train.batch_size=8"]) == 0

    ddp, single = tmp_path / "runs" / "ddp", tmp_path / "runs" / "single"
    w_ddp = load_file(str(ddp / "model" / "model.safetensors"))
    w_one = load_file(str(single / "model" / "model.safetensors"))
    assert w_ddp.keys() == w_one.keys()
    moved = 0.0
    base = load_file(str(tiny_bert_dir / "model.safetensors"))
    for k in w_one:
        torch.testing.assert_close(w_ddp[k], w_one[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
        b = base.get(k.removeprefix("bert."))
        if b is not None:
            moved = max(moved, (w_one[k] - b).abs().max().item())
    assert moved > 1e-3                          # training did move the weights

    def rows(run_dir, split):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["split"] == split]

    r_ddp, r_one = rows(ddp, "train"), rows(single, "train")
    assert [r["step"] for r in r_ddp] == [1, 2, 3]           # only rank 0 logs
    for a, b in zip(r_ddp, r_one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["lr"] == pytest.approx(b["lr"])
    assert [r["step"] for r in rows(ddp, "eval")] == [2, 3]
    assert json.loads((ddp / "eval.json").read_text())["accuracy"] == pytest.approx(
        json.loads((single / "eval.json").read_text())["accuracy"])
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
