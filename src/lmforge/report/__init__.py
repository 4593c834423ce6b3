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
from .data import RunData, load_run, warnings_for  # noqa: F401
from .html import build_html

REPORT = "report.html"
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


def report_after_training(run_dir: str | Path) -> Path | None:
    """Write ``report.html`` at the end of ``train``; a report problem never fails the run."""
    import logging

    try:
        return write_report([run_dir])
    except Exception as exc:  # the run itself is done and saved; say why the page is missing
        logging.getLogger("lmforge").warning("report.html not written: %s", exc)
        return None
