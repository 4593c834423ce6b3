"""Shared benchmark plumbing: run each trial in a fresh child process, alternate peers,
collect throughput and peak RSS, print one JSON line with medians and ratios.

Two threads on a loaded machine (measured in session 5 at load 6-9 on the 2 cores): with
libgomp's default wait policy every OpenMP fork/join of a 2-thread trial spin-waits for the
descheduled thread, which costs both sides 3-7x their CPU per step (in process, lmforge's unpadded
MiniLM LoRA step: 4351 CPU ms / 10.5 s wall, OMP_WAIT_POLICY=PASSIVE: 595 / 1.8 s; padded: 5408 ->
1751). The benches' best 2-thread figures are therefore with ``OMP_WAIT_POLICY=PASSIVE`` exported
for the whole bench (children inherit it; it is a setting either side's user has), or taken on a
quiet machine, and say which."""
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


def peer_sentence_transformer(attn: str = "sdpa", bf16: bool = False, int8: bool = False, procs: int = 0):
    """The peer's packaged MiniLM ``SentenceTransformer`` on the CPU with ``attn`` attention, bf16 weights
    (``bf16``) or PyTorch's dynamic quantisation recipe for BERT on CPU (``int8``: every ``nn.Linear`` int8,
    fbgemm, fp32 elsewhere), and with ``procs`` > 0 its multi-process pool of that many processes at 1
    intra-op thread each. Returns ``(model, encode kwargs)`` (``{"pool": ...}`` or ``{}``)."""
    import os

    import torch
    from sentence_transformers import SentenceTransformer

    from lmforge.models import resolve_model

    model = SentenceTransformer(str(resolve_model("minilm")), device="cpu", model_kwargs={"attn_implementation": attn})
    if bf16:
        model = model.to(torch.bfloat16)
    if int8:
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    if not procs:
        return model, {}
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned workers' torch reads it at start
    return model, {"pool": model.start_multi_process_pool(["cpu"] * procs)}


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's live children (a multi-process pool's workers)."""
    import psutil

    return sum(sum(k.cpu_times()[:2]) for k in psutil.Process().children(recursive=True))


def _matmul_peak(threads: int | None, n: int, seconds: float, trials: int) -> dict:
    import time

    import torch

    from lmforge.device import cpu_has_fast_bf16

    set_threads(threads)
    dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32  # what precision: auto computes in
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(3):  # warm-up (oneDNN kernel selection)
        a @ b
    rates, cpu_rates = [], []
    for _ in range(trials):
        reps, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        rates.append(2.0 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9)
        cpu_rates.append(2.0 * n ** 3 * reps / (time.process_time() - c0) / 1e9)
    return {"trials": rates, "cpu_trials": cpu_rates, "threads": torch.get_num_threads(),
            "dtype": str(dtype).removeprefix("torch.")}


def matmul_peak(threads: int | None = None, n: int = 2048, seconds: float = 1.0, trials: int = 5,
                log=sys.stderr) -> dict:
    """Measured matmul peak (GFLOP/s) of an ``n x n @ n x n`` product at ``threads``, in bf16 on a CPU
    with native bf16 and in fp32 otherwise (AVX2 only: the dtype ``precision: auto`` computes in): the
    denominator of model FLOPs utilisation (MFU). ``trials`` timed windows of ``seconds`` each in a
    fresh child; the best is kept (a shared machine only ever slows a window down) and the spread
    (min / median / max) is printed and returned, so two MFU figures can be compared."""
    res = run_isolated(_matmul_peak, threads=threads, n=n, seconds=seconds, trials=trials)
    t = sorted(res["trials"])
    c = sorted(res["cpu_trials"])
    out = {"gflops": t[-1], "min": t[0], "median": statistics.median(t), "max": t[-1], "trials": len(t),
           "threads": res["threads"], "n": n, "dtype": res["dtype"],
           # per CPU second of the process (a loaded machine stretches wall time, not CPU time)
           "gflops_per_cpu_s": c[-1], "cpu_min": c[0], "cpu_median": statistics.median(c)}
    print(f"{res['dtype']} matmul peak ({out['threads']} threads, {n}^3, best of {len(t)}): {t[-1]:.0f} GFLOP/s "
          f"(spread min {t[0]:.0f} / median {out['median']:.0f} / max {t[-1]:.0f}); per CPU second best {c[-1]:.0f} "
          f"(min {c[0]:.0f} / median {out['cpu_median']:.0f})", file=log, flush=True)
    return out


def matmul_peak_gflops(threads: int | None = None, n: int = 2048, seconds: float = 1.0) -> float:
    """The best of :func:`matmul_peak`'s trials (GFLOP/s)."""
    return matmul_peak(threads, n, seconds)["gflops"]


# ---- one timed window per trial (and its profile) ----------------------------------------------
PROFILE_GROUPS = ("matmul", "attention", "optimizer", "data", "other")
_MATMUL = ("aten::mm", "aten::_int_mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation",
           "aten::_weight_int4pack_mm", "aten::mkldnn", "aten::_mkl", "onednn")
_ATTN = ("softmax", "scaled_dot_product", "flash_attention", "attention")


def _group_of(evt) -> str:
    node = evt
    while node is not None:  # context first: anything under the optimizer step or the collator
        name = node.name
        if name.startswith("Optimizer.") or "zero_grad" in name:
            return "optimizer"
        if name.startswith("data:") or "DataLoader" in name:
            return "data"
        node = node.cpu_parent
    name = evt.name
    if name.startswith(_MATMUL):
        return "matmul"
    if any(k in name for k in _ATTN):
        return "attention"
    return "other"


def profile_summary(prof, wall_s: float, steps: int) -> dict:
    """Where a step's time goes: self CPU time of every recorded op, grouped (matmul, attention,
    optimizer, data, other); ``other`` also holds the time no op accounts for (Python, waiting).
    Returns ms per step per group and the share of the wall time."""
    ms = dict.fromkeys(PROFILE_GROUPS, 0.0)
    ops: dict[str, float] = {}
    for evt in prof.events():
        ms[_group_of(evt)] += evt.self_cpu_time_total / 1e3
        ops[evt.name] = ops.get(evt.name, 0.0) + evt.self_cpu_time_total / 1e3
    wall = wall_s * 1e3
    ms["other"] += max(wall - sum(ms.values()), 0.0)
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:15]
    return {"ms_per_step": {k: round(v / steps, 1) for k, v in ms.items()},
            "share": {k: round(v / max(wall, sum(ms.values())), 3) for k, v in ms.items()},
            "top_ops_ms_per_step": {k: round(v / steps, 1) for k, v in top}}


class Window:
    """Times the ``steps`` optimizer steps after ``warmup`` (wall and process CPU time) and, with
    ``profile``, records them with torch.profiler. Call :meth:`step` after every step with its
    1-based number (lmforge's ``on_step``, a Trainer callback's ``state.global_step``); wrap the
    collator with :meth:`wrap` to count tokens per sequence and mark data time."""

    def __init__(self, warmup: int, steps: int, profile: bool = False, count=None):
        self.warmup, self.steps, self.profile = warmup, steps, profile
        self.count = count  # batch -> list of real sequence lengths (optional)
        self.lengths: list[list[int]] = []
        self.t0 = self.t1 = self.c0 = self.c1 = None
        self._prof = None

    def wrap(self, collate):
        import torch

        def counted(*a, **kw):
            with torch.profiler.record_function("data:collate"):
                batch = collate(*a, **kw)
            if self.count is not None:
                self.lengths.append(self.count(batch))
            return batch
        return counted

    def step(self, step: int) -> None:
        import time

        if step == self.warmup:
            if self.profile:
                import torch

                self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self._prof.start()
            self.t0, self.c0 = time.perf_counter(), time.process_time()
        if step == self.warmup + self.steps:
            self.t1, self.c1 = time.perf_counter(), time.process_time()
            if self._prof is not None:
                self._prof.stop()

    def result(self, items: int | None = None, unit: str = "samples") -> dict:
        """``{unit}_per_s`` (``items`` over the window, or the counted tokens), seconds, cpu seconds
        and, when profiled, the grouped profile."""
        if self.t1 is None:
            raise RuntimeError(f"the run stopped before step {self.warmup + self.steps}")
        dt, cpu = self.t1 - self.t0, self.c1 - self.c0
        out = {"seconds": dt, "cpu_seconds": cpu}
        if self.count is not None:
            timed = [s for b in self.lengths[self.warmup:self.warmup + self.steps] for s in b]
            out.update(tokens=sum(timed), sequences=len(timed), seq_lengths=timed)
            items = sum(timed) if items is None else items
        out[f"{unit}_per_s"] = items / dt
        out[f"{unit}_per_cpu_s"] = items / cpu
        if self._prof is not None:
            out["profile"] = profile_summary(self._prof, dt, self.steps)
        return out


def timed_call(fn, profile: bool = False, steps: int = 1, unit: str = "items", items: int | None = None):
    """Run ``fn()`` once, timed (wall and CPU) and, with ``profile``, profiled (``steps``: how many
    "steps" the call counts as in the per-step profile). Returns ``(fn's result, figures)``."""
    import time

    import torch

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
    if prof is not None:
        prof.start()
    t0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"seconds": dt, "cpu_seconds": cpu}
    if items is not None:
        out[f"{unit}_per_s"], out[f"{unit}_per_cpu_s"] = items / dt, items / cpu
    if prof is not None:
        prof.stop()
        out["profile"] = profile_summary(prof, dt, steps)
    return value, out


# ---- command line, trials and the one JSON line -------------------------------------------------
def add_common_args(ap, steps: int = 20, warmup: int = 2, reps: int = 3) -> None:
    ap.add_argument("--steps", type=int, default=steps, help="timed optimizer steps per trial")
    ap.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
    ap.add_argument("--reps", type=int, default=reps, help="repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads per trial (default: torch's)")
    ap.add_argument("--only", default=None, help="comma-separated trial names to run (default: all)")
    ap.add_argument("--profile", action="store_true",
                    help="profile each trial's timed steps (matmul/attention/optimizer/data/other); timings include "
                         "the profiler's overhead")


def run_trials(trials: dict, args) -> dict[str, list[dict]]:
    """Alternate the trials (``--only`` selects), ``--profile`` passed to each, profiles printed."""
    if args.only:
        keep = args.only.split(",")
        trials = {k: v for k, v in trials.items() if k in keep}
    trials = {k: (fn, kw | {"profile": args.profile, "threads": args.threads}) for k, (fn, kw) in trials.items()}
    res = alternate(trials, reps=args.reps)
    if args.profile:
        for k, runs in res.items():
            p = runs[-1].get("profile")
            if p:
                parts = ", ".join(f"{g} {p['ms_per_step'][g]:.0f} ms ({100 * p['share'][g]:.0f}%)" for g in PROFILE_GROUPS)
                print(f"profile {k}: per step {parts}", file=sys.stderr, flush=True)
    return res


def figures(res: dict[str, list[dict]], rate: str, quality: tuple[str, ...] = ()) -> dict:
    """Median rate, CPU-time rate, peak RSS and quality figures of every trial."""
    fig = {}
    for k, runs in res.items():
        f = {rate: _sig(median(runs, rate)), "peak_rss_mb": round(median(runs, "peak_rss_mb"), 1)}
        cpu = rate.replace("_per_s", "_per_cpu_s")
        if all(cpu in r for r in runs):
            f[cpu] = _sig(median(runs, cpu))
        for q in quality:
            vals = [r[q] for r in runs if r.get(q) is not None]
            if vals:
                f[q] = round(statistics.median(vals), 4)
        if runs[-1].get("profile"):
            f["profile"] = runs[-1]["profile"]
        fig[k] = f
    return fig


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def ratios(fig: dict, rate: str, ours: str, theirs: str, lm_default: str, peer_default: str) -> dict:
    """``ratio_default``: lmforge's defaults / the peer's defaults; ``ratio_best``: the fastest measured
    lmforge trial (name prefix ``ours``) / the fastest peer trial (prefix ``theirs``); names of both
    and the peak-RSS ratios of the same pairs."""
    out = {}
    if lm_default in fig and peer_default in fig:
        out["ratio_default"] = round(fig[lm_default][rate] / fig[peer_default][rate], 3)
        out["rss_ratio_default"] = round(fig[lm_default]["peak_rss_mb"] / fig[peer_default]["peak_rss_mb"], 3)
    lm = [k for k in fig if k.startswith(ours)]
    peer = [k for k in fig if k.startswith(theirs)]
    if lm and peer:
        a, b = max(lm, key=lambda k: fig[k][rate]), max(peer, key=lambda k: fig[k][rate])
        out.update(best_lmforge=a, best_peer=b, ratio_best=round(fig[a][rate] / fig[b][rate], 3),
                   rss_ratio_best=round(fig[a]["peak_rss_mb"] / fig[b]["peak_rss_mb"], 3))
    # the same per CPU second of each trial process: steadier than wall time on a loaded machine
    cpu = rate.replace("_per_s", "_per_cpu_s")
    if lm and peer and all(cpu in fig[k] for k in lm + peer):
        if lm_default in fig and peer_default in fig:
            out["ratio_default_cpu"] = round(fig[lm_default][cpu] / fig[peer_default][cpu], 3)
        a, b = max(lm, key=lambda k: fig[k][cpu]), max(peer, key=lambda k: fig[k][cpu])
        out.update(ratio_best_cpu=round(fig[a][cpu] / fig[b][cpu], 3), best_lmforge_cpu=a, best_peer_cpu=b)
    return out


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


def sts_spearman(encode, path: str = "../shared/data/stsb/dev.jsonl", n: int = 300) -> float:
    """Spearman correlation of cosine similarity with the gold score on the first ``n`` STS-B dev
    pairs; ``encode(list[str]) -> (N, D)`` array."""
    import numpy as np
    from scipy.stats import spearmanr

    rows = [json.loads(line) for line in open(path, encoding="utf-8")][:n]
    a = np.asarray(encode([r["sentence1"] for r in rows]), dtype=np.float32)
    b = np.asarray(encode([r["sentence2"] for r in rows]), dtype=np.float32)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(spearmanr(cos, [r["score"] for r in rows]).statistic)


def causal_heldout_loss(model, tokenizer, texts: list[str], max_len: int) -> float:
    """Mean next-token cross-entropy (per token) of ``texts`` (EOS appended, truncated to
    ``max_len``) under bf16 autocast, model in eval mode: the same held-out figure for every trial."""
    import torch

    model.eval()
    dev = next(model.parameters()).device
    total = count = 0.0
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        for t in texts:
            ids = tokenizer(t + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"][:max_len]
            x = torch.tensor([ids], device=dev)
            logits = model(input_ids=x).logits.float()  # (1, T, V)
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
            total, count = total + float(loss), count + len(ids) - 1
    return total / max(count, 1)
