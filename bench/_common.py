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


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads in a benchmark child (no-op when ``threads`` is None)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _matmul_peak(threads: int | None, n: int, seconds: float) -> dict:
    import time

    import torch

    set_threads(threads)
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    for _ in range(3):  # warm-up (oneDNN kernel selection)
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    dt = time.perf_counter() - t0
    return {"gflops": 2.0 * n ** 3 * reps / dt / 1e9}


def matmul_peak_gflops(threads: int | None = None, n: int = 2048, seconds: float = 3.0) -> float:
    """Measured bf16 matmul throughput (GFLOP/s) of an ``n x n @ n x n`` product, in a fresh child:
    the denominator of model FLOPs utilisation (MFU)."""
    return run_isolated(_matmul_peak, threads=threads, n=n, seconds=seconds)["gflops"]


def llama_matmul_params(config_path) -> dict:
    """Matmul parameter count of a Llama-style HF config (every projection plus the LM head) and
    the attention-term dimensions: ``{"n": N, "layers": L, "attn_dim": heads * head_dim}``."""
    cfg = json.loads(open(config_path, encoding="utf-8").read())
    d, ff, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * ff
    return {"n": L * per_layer + V * d, "layers": L, "attn_dim": q}


def lora_train_flops(n: int, layers: int, attn_dim: int, seq_lengths) -> float:
    """Model FLOPs of one LoRA training pass over sequences of the given lengths.

    Per token: forward ``2N`` + backward activation gradients ``2N`` (the frozen base gets no
    weight gradients; the rank-r adapter FLOPs are negligible and not counted) = ``4N``; plus
    attention scores and values, ``4 * L * d_attn * s`` forward and twice that backward,
    i.e. ``12 * L * d_attn * s`` per token of a length-``s`` sequence (PaLM's convention, no
    causal halving). Summed over sequences: ``sum_s (4 N s + 12 L d_attn s^2)``.
    """
    return float(sum(4.0 * n * s + 12.0 * layers * attn_dim * s * s for s in seq_lengths))


def batch_seq_lengths(batch: dict) -> list[int]:
    """Real (non-padding) length of every sequence in a collated causal-LM batch: padded rows
    (``attention_mask``), lmforge packed rows (``sample_ids``, -1 on padding) or flattened
    padding-free rows (``position_ids`` restarting at 0 for each sequence)."""
    import torch

    if "sample_ids" in batch:
        sid = batch["sample_ids"]
        return torch.unique(sid[sid >= 0], return_counts=True)[1].tolist()
    if batch.get("attention_mask") is not None:
        return [int(x) for x in batch["attention_mask"].sum(-1).tolist() if x > 0]
    pos = batch["position_ids"].reshape(-1)
    starts = (pos == 0).nonzero().squeeze(1).tolist() + [pos.numel()]
    return [b - a for a, b in zip(starts, starts[1:]) if b > a]
