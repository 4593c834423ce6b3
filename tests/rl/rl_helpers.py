"""What the rl tests share: a tiny Llama whose logits can move (initializer_range 0.2: with the
default 0.02 the tied 32-dim embeddings cap every logit below ~0.7, so LoRA cannot raise a
token's probability much), word prompts, and an rl config."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # toy_rewards, named by dotted path in the configs
sys.path.insert(0, str(HERE.parent))

from conftest import WORDS, build_word_tokenizer, write_jsonl  # noqa: E402

from lmforge.config import build_config  # noqa: E402


def make_rl_llama(path: Path, seed: int = 0, init: float = 0.2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, vocab = build_word_tokenizer("llama")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                      tie_word_embeddings=True, initializer_range=init)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.sample(WORDS[12:], 3))} for _ in range(n)]


def rl_config(tmp: Path, model: Path, *, name: str = "run", rl: dict | None = None, train: dict | None = None,
              data: dict | None = None, rows: list[dict] | None = None, **top):
    data_file = write_jsonl(tmp / f"{name}-prompts.jsonl", prompt_rows(40) if rows is None else rows)
    raw = {"task": "rl", "name": name, "output_dir": str(tmp / "runs"), "seed": 0,
           "model": {"name": str(model), "precision": "fp32", "device": "cpu"},
           "data": {"train": str(data_file), "eval_fraction": 0.2, "max_length": 24} | (data or {}),
           "rl": {"algorithm": "grpo", "reward": "toy_rewards.fraction_positive", "max_new_tokens": 8,
                  "rollout_prompts": 8, "template": "raw", "kl_coef": 0.01} | (rl or {}),
           "adapter": {"r": 8, "alpha": 16},
           "train": {"max_steps": 8, "batch_size": 8, "lr": 2e-2, "progress": False, "log_every": 1} | (train or {})}
    return build_config(raw | top)
