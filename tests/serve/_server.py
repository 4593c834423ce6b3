"""A real `lmforge serve` process on 127.0.0.1 with tiny random models, started and stopped by tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import http.client
import json
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_models(root: Path, max_positions: int = 4096) -> dict[str, Path]:
    """A tiny Llama (long context), two random peft LoRA adapters on it, and a tiny BERT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_word_tokenizer, make_tiny_bert

    tok, vocab = build_word_tokenizer("llama")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    llm = root / "llm"
    LlamaForCausalLM(cfg).save_pretrained(llm)
    tok.save_pretrained(llm)
    out = {"llm": llm, "bert": make_tiny_bert(root / "bert")}
    for seed, name in ((1, "alpha"), (2, "beta")):
        torch.manual_seed(seed)
        base = LlamaForCausalLM.from_pretrained(llm)
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     init_lora_weights=False, task_type="CAUSAL_LM"))
        peft_model.save_pretrained(root / name)
        out[name] = root / name
    return out


def http_call(url: str, body: bytes | None = None, timeout: float = 10) -> tuple[int, str]:
    """(status, text) of a GET, or of a POST of ``body`` as JSON."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def stream_then_hang_up(host: str, port: int, path: str, body: dict, events: int) -> int:
    """POST a streaming request, read ``events`` SSE events, then close the connection."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    n = 0
    while n < events:
        line = resp.readline()
        if not line:
            break
        n += line.startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    return n


class Server:
    def __init__(self, args: list[str], cwd: Path, timeout: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.log = open(cwd / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", *args, "--port", str(self.port)],
                                     cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(cwd / f'server-{self.port}.log').read_text()[-2000:]}")
            try:
                if http_call(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("server did not start in time")

    def health(self) -> dict:
        return json.loads(http_call(self.url + "/health")[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()
