"""Serving under load: `lmforge serve` vs `transformers serve`, same model, same load, on loopback.

Each trial starts a fresh server process, warms it up with one request, then C concurrent clients
(the official openai async client) send N chat requests between them (greedy, ``max_tokens`` T)
and the trial stops by itself. Trials alternate lmforge / peer default / peer best
(``--continuous-batching`` with a paged KV cache sized for the load); the median of the repetitions is reported. Quality: the share of
fixed prompts whose greedy answer equals transformers' own ``generate`` in fp32 on the same model.

    python bench/serve_load.py                       # smollm2, 32 clients, 200 requests, 3 reps
    python bench/serve_load.py --clients 8 --requests 40 --reps 1 --max-tokens 16

Prints one JSON line: both sides' requests/s, completion tokens/s, p50/p95 latency, failures,
``ratio_default`` and ``ratio_best`` (lmforge tokens/s over the peer's).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how rain forms.",
           "List five uses of a paperclip.", "Describe the city of Paris to a child.",
           "What makes a good breakfast?", "Tell me about the history of bicycles."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, model: str, folder: Path, port: int, log: Path, max_tokens: int,
          clients: int = 32) -> subprocess.Popen:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if kind == "lmforge":
        cmd = [sys.executable, "-m", "lmforge", "serve", model, "--name", model, "--port", str(port), "--max-batch", "32",
               "--max-tokens", str(max(max_tokens, 64))]
    else:
        cmd = [str(Path(sys.executable).with_name("transformers")), "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port)]
        if kind == "peer_best":
            # paged KV cache sized for the load: its CPU default reserves ~12 GB and is OOM-killed here
            blocks = 2 * -(-clients * (96 + max_tokens) // 32)
            cmd += ["--continuous-batching", "--cb-block-size", "32", "--cb-num-blocks", str(blocks),
                    "--cb-max-batch-tokens", "1024"]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_up(proc: subprocess.Popen, url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("server did not come up")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


async def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=1800, max_retries=0)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    lat, fails, tokens = [], [], 0

    async def worker():
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            t0 = time.perf_counter()
            try:
                r = await ac.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    max_tokens=max_tokens, temperature=0)
                tokens += r.usage.completion_tokens if r.usage else 0
                lat.append(time.perf_counter() - t0)
            except Exception as exc:
                fails.append(repr(exc)[:200])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await ac.close()
    lat.sort()
    return {"ok": len(lat), "failed": len(fails), "wall_s": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1) if lat else None, "errors": fails[:2]}


def answers(url: str, model: str, n: int, k: int = 4) -> list[str]:
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=1800, max_retries=0)
    return [c.chat.completions.create(model=model, messages=[{"role": "user", "content": p}], max_tokens=n,
                                      temperature=0).choices[0].message.content for p in PROMPTS[:k]]


def reference(folder: Path, n: int, k: int = 4) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for p in PROMPTS[:k]:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        out.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sides", default="lmforge,peer_default,peer_best")
    ap.add_argument("--quality-prompts", type=int, default=4, help="greedy answers compared (0: warm-up only)")
    args = ap.parse_args()
    from lmforge.models import resolve_model

    folder = resolve_model(args.model)
    k = args.quality_prompts
    ref = reference(folder, 24, k) if k else []
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "lmforge_serve_bench"
    logs.mkdir(exist_ok=True)
    sides = args.sides.split(",")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    quality: dict[str, float] = {}
    for rep in range(args.reps):
        for side in sides:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            model = args.model if side == "lmforge" else str(folder)
            proc = start(side, args.model, folder, port, logs / f"{side}-{rep}.log", args.max_tokens, args.clients)
            try:
                wait_up(proc, url)
                got = answers(url, model, 24 if k else 2, max(k, 1))  # also the warm-up
                if k:
                    quality[side] = sum(a == b for a, b in zip(got, ref)) / len(ref)
                runs[side].append(asyncio.run(load(url, model, args.clients, args.requests, args.max_tokens)))
            except Exception as exc:
                runs[side].append({"ok": 0, "failed": args.requests, "tokens_per_s": 0.0, "errors": [repr(exc)[:200]]})
            finally:
                stop(proc)

    def med(side: str) -> dict:
        rs = runs[side]
        out = {k: statistics.median([r[k] for r in rs if r.get(k) is not None] or [0])
               for k in ("requests_per_s", "tokens_per_s", "p50_ms", "p95_ms")}
        return out | {"failed": sum(r["failed"] for r in rs), "quality_greedy_match": quality.get(side),
                      "errors": [e for r in rs for e in r.get("errors", [])][:2]}

    res = {s: med(s) for s in sides}
    line = {"bench": "serve_load", "model": args.model, "clients": args.clients, "requests": args.requests,
            "max_tokens": args.max_tokens, "reps": args.reps} | res
    lm = res.get("lmforge", {}).get("tokens_per_s") or 0
    for key, side in (("ratio_default", "peer_default"), ("ratio_best", "peer_best")):
        peer = res.get(side, {}).get("tokens_per_s") or 0
        line[key] = round(lm / peer, 3) if peer else None
    print(json.dumps(line))


if __name__ == "__main__":
    main()
