"""The run report: one self-contained HTML file per run, or one comparing several runs.

``write_report(["runs/a"])`` writes ``runs/a/report.html``; with several runs the curves are
overlaid and the config keys that differ and the final metrics are tabled side by side (default
file: ``report_compare.html`` in the first run). The page needs no network: inline CSS, inline SVG
plots (:mod:`lmforge.report.svg`), pictures as data URIs and the raw numbers as embedded JSON.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import LmforgeError
from .analysis import warnings_for  # noqa: F401
from .data import RunData, load_run  # noqa: F401
from .html import build_html

REPORT = "report.html"
RUN_INFO = "run_info.json"
COMPARE_REPORT = "report_compare.html"


def write_report(runs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Read ``runs`` and write the report; returns its path.

    Args:
        runs: one or more run directories.
        out: the HTML file (default: ``<run>/report.html``, or ``<first run>/report_compare.html``).
    """
    from ..rundir import write_text

    if not runs:
        raise LmforgeError("report: give at least one run directory")
    data = [load_run(r) for r in runs]
    names = [d.name for d in data]
    for i, d in enumerate(data):  # same folder names under different parents stay apart
        if names.count(d.name) > 1:
            d.name = f"{d.path.parent.name}/{d.name}" if d.path.parent.name else f"{d.name}#{i + 1}"
    if out is None:
        out = Path(runs[0]) / (REPORT if len(data) == 1 else COMPARE_REPORT)
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise LmforgeError(f"{out}: the report is an HTML file; give --out FILE.html")
    write_text(out, build_html(data))
    return out


def run_info(task=None) -> dict:
    """What the training process knows at its end: environment (versions, device, threads, with
    a hash), data sizes, parameter counts and the process's peak resident memory."""
    import hashlib
    import json
    import os
    import platform
    import sys

    env: dict = {"python": platform.python_version(), "platform": platform.platform(),
                 "cpu_count": os.cpu_count()}
    for mod in ("torch", "transformers", "lmforge"):
        m = sys.modules.get(mod)
        env[mod] = getattr(m, "__version__", None) if m else None
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch_threads"] = torch.get_num_threads()
    info: dict = {}
    if task is not None:
        placement = getattr(task, "placement", None)
        if placement is not None and hasattr(placement, "describe"):
            env["device"] = placement.describe()
        for key, attr in (("train_size", "train_items"), ("eval_size", "eval_items")):
            items = getattr(task, attr, None)
            if items is not None and hasattr(items, "__len__"):
                info[key] = len(items)
        model = getattr(task, "model", None)
        if model is not None and hasattr(model, "parameters"):
            params = list(model.parameters())
            info["trainable_params"] = int(sum(p.numel() for p in params if p.requires_grad))
            info["total_params"] = int(sum(p.numel() for p in params))
    try:
        import resource

        info["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    except (ImportError, OSError):
        pass
    env_hash = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]
    return {"environment": env, "environment_hash": env_hash} | info


def report_after_training(run_dir: str | Path, task=None) -> Path | None:
    """At the end of ``train`` (same process): record ``run_info.json`` (:func:`run_info`) and the
    task's sample generations (``samples.jsonl``, when it kept some), then write ``report.html``.
    A report problem never fails the run: it is logged as one warning."""
    import logging

    from ..rundir import write_json, write_jsonl

    try:
        run_dir = Path(run_dir)
        write_json(run_dir / RUN_INFO, run_info(task))
        # before/after rows of sample_outputs() (api.train_config), else the task's last eval generations
        samples = getattr(task, "sample_rows", None) or getattr(task, "last_generations", None)
        if isinstance(samples, list) and samples:
            write_jsonl(run_dir / "samples.jsonl", [s for s in samples[:12] if isinstance(s, dict)])
        return write_report([run_dir])
    except Exception as exc:  # the run itself is done and saved; say why the page is missing
        logging.getLogger("lmforge").warning("report.html not written: %s", exc)
        return None
