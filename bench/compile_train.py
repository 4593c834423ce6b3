"""Prompt-tuning MiniLM train step (unpadded, bf16 autocast): plain vs torch.compile of each layer's
FFN (intermediate + output) and attention output blocks, dynamic shapes. CPU seconds, 1 thread
(compile in this process: ``compile_threads = 1``). Not a test: a measurement script.

    .venv/bin/python bench/compile_train.py plain|compile
"""
import json, random, sys, time
import torch
torch.set_num_threads(1)
import torch._inductor.config as icfg
icfg.compile_threads = 1
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()
from lmforge.adapters import apply_adapter
from lmforge.adapters.prompt import PromptSpec
from lmforge.device import Placement
from lmforge.models import resolve_model
from lmforge.unpad import enable_unpadding
mode = sys.argv[1]
folder = resolve_model("minilm")
tok = AutoTokenizer.from_pretrained(folder)
rows = [json.loads(l)["sentence"] for l in open(__import__("pathlib").Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst2" / "train.jsonl")]
random.Random(0).shuffle(rows)
place = Placement.resolve("cpu", "bf16")
torch.manual_seed(0)
m = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, attn_implementation="eager")
for q in m.parameters(): q.requires_grad_(False)
m.classifier.requires_grad_(True)
apply_adapter(m, PromptSpec(num_virtual_tokens=20))
place.cast_frozen(m)
enable_unpadding(m)
if mode == "compile":
    for layer in m.bert.encoder.layer:
        layer.intermediate = torch.compile(layer.intermediate, dynamic=True)
        layer.output = torch.compile(layer.output, dynamic=True)
        layer.attention.output = torch.compile(layer.attention.output, dynamic=True)
m.train()
opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3)
batches = [tok(rows[s*32:(s+1)*32], truncation=True, max_length=64, padding=True, return_tensors="pt") for s in range(14)]
def step(b):
    with place.autocast():
        logits = m(**b).logits.float()
    torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long)).backward()
    opt.step(); opt.zero_grad()
c = time.process_time(); w = time.perf_counter()
for b in batches[:4]: step(b)
first = time.process_time() - c; firstw = time.perf_counter() - w
c = time.process_time()
for b in batches[4:]: step(b)
print(json.dumps({"mode": mode, "warm_4_steps_cpu_s": round(first, 2), "warm_wall_s": round(firstw, 1), "cpu_ms_per_step": round((time.process_time() - c) / 10 * 1e3, 1)}))
