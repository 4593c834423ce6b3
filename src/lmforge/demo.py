"""`make demo`: LoRA fine-tuning of the packaged MiniLM on Rotten Tomatoes, evaluation, prediction.

Run from the repository root: ``python -m lmforge.demo [key=value ...]``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

RECIPE = Path("recipes/demo_rt_lora.yaml")
EXAMPLES = [
    "A gorgeous, heartfelt film with a script that never stops surprising you.",
    "Tedious and overlong; even the talented cast can't rescue this mess.",
    "Not the disaster I was told to expect, but hardly worth the ticket price.",
]


def run(overrides: list[str]) -> int:
    from . import api
    from .config import load_config
    from .errors import LmforgeError
    from .progress import quiet_libraries

    quiet_libraries()  # as the CLI: no carriage-return bars from transformers in a demo log
    t0 = time.perf_counter()
    try:
        run = api.train_config(load_config(RECIPE, overrides))
        ev = run.metrics | json.loads((run.run_dir / "eval.json").read_text())
        print(f"\nheld-out accuracy {ev['accuracy']:.4f}, macro-F1 {ev['macro_f1']:.4f} "
              f"(best {ev.get('best_accuracy', ev['accuracy']):.4f} at step {ev.get('best_step', ev['step'])})")
        predictions = api.load(run.run_dir).predict(EXAMPLES)
    except LmforgeError as err:
        print(f"lmforge: error: {err}", file=sys.stderr)
        return 2
    print("\npredictions:")
    for r in predictions:
        print(f"  {r['label']:>6} ({r['score']:.2f})  {r['text']}")
    print(f"\nadapter (PEFT format): {run.run_dir / 'adapter'}   total time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
