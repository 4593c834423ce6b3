"""The pure analysis the report shows, on a :class:`~lmforge.report.data.RunData`: series of logged
values, debiased EMA, best values, loss spikes, an eval metric peaking early, the automatic
warnings, the summary table, config keys that differ between runs.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Sequence

from .data import RunData


def _num(v) -> float | None:
    """A float from a logged value (``"nan"``/``"inf"`` strings are how non-finite values are logged)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(v)
    return None



def series(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key`` over logged rows (non-finite values kept as nan/inf)."""
    xs, ys = [], []
    for r in rows:
        x, y = _num(r.get("step")), _num(r.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def numeric_keys(rows: Sequence[dict], skip: Sequence[str] = ("step", "epoch", "time")) -> list[str]:
    """Keys holding numbers in any row, in first-seen order."""
    seen: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k not in skip and _num(v) is not None:
                seen.setdefault(k, None)
    return list(seen)


def ema(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing).

    ``m_t = beta m_{t-1} + (1 - beta) x_t`` with ``m_0 = 0``, and ``s_t = m_t / (1 - beta^t)``
    (t = 1, 2, ...), so ``s_1 = x_1``. Non-finite ``x_t`` are skipped (``s_t`` repeats).
    """
    out, m, t = [], 0.0, 0
    for x in values:
        if math.isfinite(x):
            t += 1
            m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta ** t) if t else float("nan"))
    return out


def best_index(values: Sequence[float], greater: bool) -> int | None:
    """Index of the best finite value (the first one on ties), or None."""
    best = None
    for i, v in enumerate(values):
        if math.isfinite(v) and (best is None or (v > values[best] if greater else v < values[best])):
            best = i
    return best


def greater_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (losses, perplexity, errors: smaller)."""
    m = metric.lower()
    return not any(w in m for w in ("loss", "perplexity", "ppl", "error", "mae", "mse", "rmse", "wer", "uniformity",
                                    "alignment"))


def loss_spikes(values: Sequence[float], window: int = 10, factor: float = 2.0) -> list[int]:
    """Indices where the loss jumps above ``factor`` times the median of the previous ``window``
    finite values (needs ``window`` values of history; non-finite values are not spikes here)."""
    out, hist = [], []
    for i, v in enumerate(values):
        if not math.isfinite(v):
            continue
        if len(hist) >= window:
            ref = sorted(hist[-window:])[window // 2]
            if ref > 0 and v > factor * ref:
                out.append(i)
        hist.append(v)
    return out


def early_peak(steps: Sequence[float], values: Sequence[float], greater: bool, *, frac: float = 0.5,
               drop: float = 0.02) -> tuple[float, float, float] | None:
    """``(best_step, best, last)`` when the best eval value came in the first ``frac`` of the
    evaluated steps and the last value is worse by more than ``drop`` (relative); else None."""
    fin = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if len(fin) < 3:
        return None
    i = best_index([v for _, v in fin], greater)
    best_step, best = fin[i]
    last = fin[-1][1]
    span = fin[-1][0] - fin[0][0]
    worse = (best - last) if greater else (last - best)
    if span > 0 and (best_step - fin[0][0]) <= frac * span and worse > drop * max(abs(best), 1e-12):
        return best_step, best, last
    return None


def warnings_for(run: RunData) -> list[str]:
    """Automatic warnings: NaN/inf stop, an unfinished run, loss spikes, an eval metric peaking
    early, negative KL, classes never predicted, cut metric lines."""
    out: list[str] = []
    stop = stopped(run)
    if stop:
        out.append(stop + " (the last good checkpoint is kept)")
    steps, loss = series(run.train, "loss")
    bad = [(s, v) for s, v in zip(steps, loss) if not math.isfinite(v)]
    if bad and not stop:
        out.append(f"non-finite loss ({bad[0][1]}) at step {bad[0][0]:.0f}: the run stopped there")
    status = run.final.get("status") or run.final.get("error")
    if isinstance(status, str) and any(w in status.lower() for w in ("nan", "non-finite", "inf")):
        out.append(f"run stopped: {status}")
    if not run.final and run.train and not stop:
        out.append("no eval.json: the run did not finish (stopped, killed or still running)")
    spikes = loss_spikes(loss)
    if spikes:
        where = ", ".join(f"{steps[i]:.0f}" for i in spikes[:5])
        out.append(f"loss spike{'s' if len(spikes) > 1 else ''} (> 2x the median of the previous 10 logs) "
                   f"at step {where}{' ...' if len(spikes) > 5 else ''}")
    for key in numeric_keys(run.eval):
        if key in ("samples_per_s", "n", "n_sentences", "trainable_params") or key.endswith("_n"):
            continue
        xs, ys = series(run.eval, key)
        peak = early_peak(xs, ys, greater_is_better(key))
        if peak:
            out.append(f"eval {key} peaked early: {peak[1]:.4g} at step {peak[0]:.0f}, "
                       f"{ys[-1]:.4g} at the last eval (step {xs[-1]:.0f}); consider best/ or fewer steps")
    for rows in (run.train, run.eval):
        for key in numeric_keys(rows):
            if "kl" in key.lower().replace("/", "_").split("_") or key.lower().endswith("kl"):
                xs, ys = series(rows, key)
                neg = [(s, v) for s, v in zip(xs, ys) if math.isfinite(v) and v < -1e-4]
                if neg:
                    out.append(f"negative KL ({key} = {neg[0][1]:.4g} at step {neg[0][0]:.0f}): the estimator is "
                               f"off (sampling, reference model or masking)")
    out += data_report_lines(run.final.get("data_report"))
    for w in run.final.get("warnings", []) or []:
        if isinstance(w, str):
            out.append(w)
    if run.bad_lines:
        out.append(f"{run.bad_lines} unreadable line(s) in metrics.jsonl (cut by a killed process)")
    if run.config_note:
        out.append(run.config_note)
    return out


def data_report_lines(report) -> list[str]:
    """One line per split of an ``eval.json`` ``data_report`` (rows a task dropped or cut while
    reading: ``{split: {"total", "truncated", "dropped": {reason: {"count", "first"}}}}``)."""
    out = []
    for split, rep in (report or {}).items() if isinstance(report, dict) else []:
        if not isinstance(rep, dict):
            continue
        dropped = {k: v.get("count", 0) for k, v in (rep.get("dropped") or {}).items() if isinstance(v, dict)}
        parts = [f"{n} dropped ({reason})" for reason, n in dropped.items() if n]
        if rep.get("truncated"):
            parts.append(f"{rep['truncated']} truncated")
        if parts:
            out.append(f"{split} data: {', '.join(parts)} of {rep.get('total', '?')} rows")
    return out


def stopped(run: RunData) -> str | None:
    """``"stopped at step N: <reason>"`` when the engine recorded a stop (``{"split": "event",
    "event": "stopped", "reason", "step"}`` in metrics.jsonl, e.g. a non-finite loss), else None."""
    for ev in reversed(run.events):
        if ev.get("event") == "stopped":
            step = _num(ev.get("step"))
            where = f" at step {step:.0f}" if step is not None and math.isfinite(step) else ""
            return f"stopped{where}: {ev.get('reason') or 'unknown reason'}"
    return None


def flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": v}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of the config (first 12 hex digits)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def summary(run: RunData) -> dict[str, Any]:
    """The run summary table: task, model, adapter, sizes, time, throughput, memory, hashes."""
    cfg = run.config
    task = cfg.get("task")
    section = cfg.get(task, {}) if isinstance(task, str) and isinstance(cfg.get(task), dict) else {}
    model = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
    lora = cfg.get("lora", {}) if isinstance(cfg.get("lora"), dict) else {}
    mode = section.get("mode") or ("lora" if lora else None)
    adapter = (f"{mode}" + (f" r={lora.get('r')} alpha={lora.get('alpha')}" if mode in ("lora", "qlora") and lora
                             else "")) if mode else None
    times = [t for t in (_num(r.get("time")) for r in run.train + run.eval) if t is not None]
    sps = [v for v in series(run.train, "samples_per_s")[1] if math.isfinite(v)]
    tps = [v for v in series(run.train, "tokens_per_s")[1] if math.isfinite(v)]
    info = run.env
    peak = [v for k in ("peak_rss_mb", "peak_memory_mb") for v in series(run.train, k)[1]]
    if _num(info.get("peak_rss_mb")) is not None:
        peak.append(float(info["peak_rss_mb"]))
    data = cfg.get("data", {}) if isinstance(cfg.get("data"), dict) else {}
    trainable, total = info.get("trainable_params"), info.get("total_params")
    if trainable is None and isinstance(run.final.get("trainable_params"), dict):  # classify's eval.json
        trainable, total = run.final["trainable_params"].get("trainable"), run.final["trainable_params"].get("total")
    if isinstance(trainable, int) and isinstance(total, int) and total:
        trainable = f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
    env = info.get("environment") if isinstance(info.get("environment"), dict) else {}
    out = {
        "status": stopped(run) or (None if run.final else "no eval.json (not finished)"),
        "task": task, "model": model.get("name"), "adapter": adapter or None,
        "trainable parameters": trainable,
        "train data": data.get("train"), "eval data": data.get("eval"),
        "train size": info.get("train_size"),
        "eval size": info.get("eval_size") or run.final.get("n") or run.final.get("n_sentences"),
        "steps": run.final.get("step") or (int(series(run.train, "step")[0][-1]) if run.train else None),
        "wall time": _duration(max(times) - min(times)) if len(times) > 1 else None,
        "samples/s (mean)": round(sum(sps) / len(sps), 2) if sps else None,
        "tokens/s (mean)": round(sum(tps) / len(tps), 1) if tps else None,
        "peak memory (MB, process RSS)": round(max(peak), 1) if peak else None,
        "device": env.get("device"),
        "versions": ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "transformers", "lmforge") if env.get(k))
                    or None,
        "config hash": config_hash(cfg) if cfg else None,
        "environment hash": info.get("environment_hash") or "not recorded",
    }
    return {k: v for k, v in out.items() if v not in (None, "", [])}


def _duration(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def differing_config(runs: Sequence[RunData]) -> list[tuple[str, list]]:
    """Dotted config keys whose values differ between runs, with each run's value."""
    flats = [flat(r.config) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    return [(k, [f.get(k) for f in flats]) for k in keys
            if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]


def final_scalars(run: RunData) -> dict[str, float]:
    """The numeric top-level values of ``eval.json``."""
    return {k: float(v) for k, v in run.final.items() if _num(v) is not None and not isinstance(v, bool)}
