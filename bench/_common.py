"""Shared benchmark plumbing: run each trial in a fresh child process, alternate peers,
collect throughput and peak RSS, print one JSON line with medians and ratios."""
from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import sys
from typing import Callable


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(fn: Callable[..., dict], kwargs: dict, q) -> None:
    import contextlib

    try:
        with contextlib.redirect_stdout(sys.stderr):  # peers print their own summaries
            out = fn(**kwargs)
        out["peak_rss_mb"] = peak_rss_mb()
        q.put(("ok", out))
    except BaseException as exc:  # report, don't hang the parent
        import traceback

        q.put(("err", "".join(traceback.format_exception(exc))))


def run_isolated(fn: Callable[..., dict], **kwargs) -> dict:
    """Run ``fn(**kwargs)`` in a fresh spawned process; return its dict plus its peak RSS."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, kwargs, q))
    p.start()
    status, out = q.get()
    p.join()
    if status != "ok":
        raise RuntimeError(out)
    return out


def alternate(trials: dict[str, tuple[Callable[..., dict], dict]], reps: int, log=sys.stderr) -> dict[str, list[dict]]:
    """Run every named trial ``reps`` times, alternating A, B, A, B ... in fresh processes."""
    results: dict[str, list[dict]] = {k: [] for k in trials}
    for r in range(reps):
        order = list(trials) if r % 2 == 0 else list(reversed(trials))
        for name in order:
            fn, kw = trials[name]
            res = run_isolated(fn, **kw)
            results[name].append(res)
            print(f"[rep {r + 1}/{reps}] {name}: {json.dumps(res)}", file=log, flush=True)
    return results


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def emit(record: dict) -> None:
    """Print the benchmark's one JSON line (stdout)."""
    print(json.dumps(record), flush=True)
