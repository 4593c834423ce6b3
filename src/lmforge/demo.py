"""`make demo`: LoRA fine-tuning of the packaged MiniLM on Rotten Tomatoes, evaluation, prediction.

Run from the repository root: ``python -m lmforge.demo [key=value ...]``.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from .cli import main as cli

RECIPE = Path("recipes/demo_rt_lora.yaml")
EXAMPLES = [
    "A gorgeous, heartfelt film with a script that never stops surprising you.",
    "Tedious and overlong; even the talented cast can't rescue this mess.",
    "Not the disaster I was told to expect, but hardly worth the ticket price.",
]


def run(overrides: list[str]) -> int:
    t0 = time.perf_counter()
    rc = cli(["train", str(RECIPE), *overrides])
    if rc:
        return rc
    run_dir = Path("runs/demo-rt-lora")
    for o in overrides:
        if o.startswith("name="):
            run_dir = Path("runs") / o.split("=", 1)[1]
    ev = json.loads((run_dir / "eval.json").read_text())
    print(f"\nheld-out accuracy {ev['accuracy']:.4f}, macro-F1 {ev['macro_f1']:.4f} "
          f"(best {ev.get('best_accuracy', ev['accuracy']):.4f} at step {ev.get('best_step', ev['step'])})")
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "examples.jsonl"
        inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in EXAMPLES))
        out = run_dir / "demo_predictions.jsonl"
        rc = cli(["predict", str(run_dir), "--input", str(inp), "--out", str(out)])
        if rc:
            return rc
    print("\npredictions:")
    for line in out.read_text().splitlines():
        r = json.loads(line)
        print(f"  {r['label']:>6} ({r['score']:.2f})  {r['text']}")
    print(f"\nadapter (PEFT format): {run_dir / 'adapter'}   total time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
