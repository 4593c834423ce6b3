"""Run logging: metrics.jsonl, TensorBoard (when installed) and progress for people.

Progress is a tqdm bar only on a terminal; in a log (no TTY) it is one concise line per logging
interval with elapsed time and a linear estimate of the time left, never carriage-return redraws.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..progress import LineProgress, progress, progress_line  # noqa: F401  (re-exported)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _after_existing_event_files(folder: Path) -> None:
    """Wait (at most about a second) until a new event file's name sorts after every existing one.

    TensorBoard reads a folder's event files in name order, ``events.out.tfevents.<unix second>.
    <host>.<pid>...``: a resumed run started within the same second as the last file could sort
    before it (by pid), and its purge of the redone steps would then be read first and undone.
    """
    import time

    newest = 0
    for f in folder.glob("events.out.tfevents.*"):
        part = f.name.split(".")[3] if len(f.name.split(".")) > 3 else ""
        if part.isdigit():
            newest = max(newest, int(part))
    while int(time.time()) <= newest and newest - time.time() < 2:
        time.sleep(0.05)


class RunLogger:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, purge_step: int | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run drops TensorBoard events of the steps it does again
                if purge_step is not None:
                    _after_existing_event_files(run_dir / "tensorboard")
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
            except Exception:  # tensorboard not installed
                self.tb = None

    def log(self, record: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        rec = {"split": split, "time": round(time.time(), 3)} | {k: _clean(v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
