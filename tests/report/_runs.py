"""Run directories written by hand for the report tests (the layout `lmforge train` writes)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path


def make_run(root: Path, name: str, *, steps: int = 60, eval_every: int = 10, lr: float = 1e-3, seed: int = 0,
             spike_at: int | None = None, nan_at: int | None = None, peak_early: bool = False,
             kl: bool = False, stop_at: int | None = None) -> Path:
    rng = random.Random(seed)
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        "task: classify\n"
        f"name: {name}\n"
        "model:\n  name: tiny-bert\n"
        f"data:\n  train: data/train.jsonl\n"
        f"classify:\n  mode: lora\n"
        f"train:\n  lr: {lr}\n  max_steps: {steps}\n  eval_every: {eval_every}\n", encoding="utf-8")
    rows = []
    for s in range(1, steps + 1):
        loss = 2.0 / math.sqrt(s) + 0.05 * rng.random()
        if spike_at == s:
            loss *= 6
        if nan_at is not None and s >= nan_at:
            rows.append({"split": "train", "time": 1000.0 + s, "step": s, "loss": "nan", "lr": lr})
            break
        if stop_at == s:  # what the engine's NaN guard records before it raises
            rows.append({"split": "event", "time": 1000.0 + s, "step": s, "event": "stopped",
                         "reason": "non-finite loss", "loss": "nan"})
            break
        rec = {"split": "train", "time": 1000.0 + s, "step": s, "epoch": s / steps, "loss": loss,
               "lr": lr * (1 - s / steps), "samples_per_s": 30 + rng.random(), "tokens_per_s": 900 + rng.random(),
               "grad_norm": 1.0 + rng.random()}
        if kl:
            rec |= {"kl": 0.02 * s - 0.5, "entropy": 3.0 - 0.01 * s, "reward": 0.01 * s}
        rows.append(rec)
        if s % eval_every == 0:
            acc = (0.9 - 0.004 * s) if peak_early else (0.5 + s / (3 * steps))
            rows.append({"split": "eval", "time": 1000.5 + s, "step": s, "accuracy": acc, "loss": 1 / s})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if stop_at is not None:
        (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
            {"input": "Summarize: A: hi B: hello", "before": "Hello! How can I", "after": "A greets B.",
             "reference": "A and B greet."},
            {"input": "Summarize: A: bye", "before": "Goodbye", "after": "A leaves.", "reference": "A says bye."}]),
            encoding="utf-8")
    if nan_at is None and stop_at is None:
        (run / "eval.json").write_text(json.dumps({
            "step": steps, "accuracy": 0.75, "macro_f1": 0.74, "n": 20,
            "per_class": {"pos": {"precision": 0.8, "recall": 0.7, "f1": 0.75, "support": 10},
                          "neg": {"precision": 0.7, "recall": 0.8, "f1": 0.75, "support": 10}},
            "confusion_matrix": [[7, 3], [2, 8]],
            "per_type": {"PER": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 5},
                         "LOC": {"precision": 0.6, "recall": 0.5, "f1": 0.55, "support": 4}},
            "sts_scatter": {"pred": [0.1, 0.5, 0.9, 0.3], "gold": [0.0, 2.5, 5.0, 1.0]},
            "rewards/chosen": 0.4, "rewards/rejected": -0.2, "rewards/margins": 0.6,
            "samples": [{"input": "good movie </script>", "before": "neg", "after": "pos", "gold": "pos"}]}),
            encoding="utf-8")
    (run / "labels.json").write_text('["pos", "neg"]', encoding="utf-8")
    return run
