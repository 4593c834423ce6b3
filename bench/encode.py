"""Sentence encoding: lmforge vs sentence-transformers, side by side.

Same packaged MiniLM (all-MiniLM-L6-v2), the same sentences (default: the first 5,000 distinct
STS-B train sentences), the same batch size. Each trial runs in a fresh process (model load and
a short warm-up are not timed); peers alternate; the medians of ``--reps`` repetitions are
reported. sentence-transformers runs its default (fp32); lmforge its default (automatic
precision: bf16 on CPUs with AMX / AVX512-BF16, weights stored in bf16 for inference). For
reference sentence-transformers also runs with its weights cast to bf16. The vectors of the last
repetition are compared with sentence-transformers' fp32 vectors (cosine per sentence). Throughput is given per
wall-clock second and per CPU second of the process (the latter is steadier on a shared machine;
run with OMP_NUM_THREADS=1 there). Prints one JSON line.

    .venv/bin/python bench/encode.py [--n 5000] [--batch-size 32] [--reps 3] [--data FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, emit, median  # noqa: E402

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


def run_st(sentences_file: str, batch: int, vectors_out: str, bf16: bool = False) -> dict:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from lmforge.models import resolve_model

    texts = json.loads(Path(sentences_file).read_text(encoding="utf-8"))
    model = SentenceTransformer(str(resolve_model("minilm")), device="cpu")
    if bf16:
        model = model.bfloat16()
    model.encode(texts[:64], batch_size=batch)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    vecs = model.encode(texts, batch_size=batch, show_progress_bar=False)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.save(vectors_out, np.asarray(vecs, dtype=np.float32))
    return {"sentences_per_s": len(texts) / dt, "sentences_per_cpu_s": len(texts) / cpu, "seconds": dt}


def run_lmforge(sentences_file: str, batch: int, vectors_out: str, precision: str) -> dict:
    import numpy as np

    from lmforge.device import Placement
    from lmforge.embeddings import SentenceEncoder

    texts = json.loads(Path(sentences_file).read_text(encoding="utf-8"))
    enc = SentenceEncoder.from_pretrained("minilm")
    place = Placement.resolve("cpu", precision)
    enc.to_inference(place)
    enc.encode(texts[:64], batch_size=batch, placement=place)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    vecs = enc.encode(texts, batch_size=batch, placement=place)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.save(vectors_out, vecs)
    return {"sentences_per_s": len(texts) / dt, "sentences_per_cpu_s": len(texts) / cpu, "seconds": dt,
            "precision": place.name}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def cosines(a_file: str, b_file: str):
    import numpy as np

    a, b = np.load(a_file), np.load(b_file)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min()), float(cos.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=STSB)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--precision", default="auto", help="lmforge precision (auto, fp32, bf16)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    sent_file = tmp / "sentences.json"
    sent_file.write_text(json.dumps(load_sentences(args.data, args.n)), encoding="utf-8")
    st_vec, lm_vec, stb_vec = str(tmp / "st.npy"), str(tmp / "lmforge.npy"), str(tmp / "st_bf16.npy")
    common = {"sentences_file": str(sent_file), "batch": args.batch_size}
    results = alternate({
        "sentence_transformers": (run_st, common | {"vectors_out": st_vec}),
        "lmforge": (run_lmforge, common | {"vectors_out": lm_vec, "precision": args.precision}),
        "sentence_transformers_bf16": (run_st, common | {"vectors_out": stb_vec, "bf16": True}),
    }, args.reps)
    st, lm, stb = results["sentence_transformers"], results["lmforge"], results["sentence_transformers_bf16"]
    cmin, cmean = cosines(st_vec, lm_vec)
    bmin, _ = cosines(st_vec, stb_vec)
    st_sps, lm_sps = median(st, "sentences_per_s"), median(lm, "sentences_per_s")
    emit({
        "bench": "encode", "model": "minilm (all-MiniLM-L6-v2)", "sentences": args.n, "batch_size": args.batch_size,
        "reps": args.reps, "lmforge_precision": lm[-1]["precision"], "sentence_transformers_precision": "fp32",
        "sentence_transformers_sentences_per_s": round(st_sps, 1), "lmforge_sentences_per_s": round(lm_sps, 1),
        "ratio": round(lm_sps / st_sps, 3),
        "sentence_transformers_sentences_per_cpu_s": round(median(st, "sentences_per_cpu_s"), 1),
        "lmforge_sentences_per_cpu_s": round(median(lm, "sentences_per_cpu_s"), 1),
        "ratio_cpu_time": round(median(lm, "sentences_per_cpu_s") / median(st, "sentences_per_cpu_s"), 3),
        "threads": _threads(),
        "cosine_min": round(cmin, 6), "cosine_mean": round(cmean, 6),
        "sentence_transformers_bf16_weights_sentences_per_s": round(median(stb, "sentences_per_s"), 1),
        "ratio_vs_bf16_weights": round(lm_sps / median(stb, "sentences_per_s"), 3),
        "sentence_transformers_bf16_weights_cosine_min": round(bmin, 6),
        "sentence_transformers_peak_rss_mb": round(median(st, "peak_rss_mb"), 1),
        "lmforge_peak_rss_mb": round(median(lm, "peak_rss_mb"), 1),
    })


if __name__ == "__main__":
    main()
