"""Prompts for generation as token ids: chat messages through the tokenizer's chat template (or a
plain transcript), raw texts through the tokenizer, and the end-of-sequence ids to stop at.
"""
from __future__ import annotations

from collections.abc import Sequence

from .errors import LmforgeError

Prompt = str | list[dict]  # a text, or chat messages [{"role": ..., "content": ...}]


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt text for chat ``messages``: the tokenizer's chat template with the generation
    prompt, or a plain ``User: ... / Assistant:`` transcript when it has none."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LmforgeError(f"message {i + 1} must be an object with text 'role' and 'content'")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def encode_prompts(tokenizer, prompts: Sequence[Prompt], chat: bool) -> list[list[int]]:
    """Token ids of each prompt: chat messages (or a text, when ``chat``) through :func:`render_chat`,
    a raw text through the tokenizer (with its special tokens, e.g. BOS)."""
    encoded = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p.strip():
                raise LmforgeError(f"prompt {i + 1} is empty")
            if chat:
                p = [{"role": "user", "content": p}]
        elif not isinstance(p, list) or not p:
            raise LmforgeError(f"prompt {i + 1} must be a text or a non-empty list of chat messages")
        if isinstance(p, list):
            ids = tokenizer(render_chat(tokenizer, p), add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(p)["input_ids"]
        if not ids:
            raise LmforgeError(f"prompt {i + 1} encodes to no tokens")
        encoded.append(list(ids))
    return encoded


def eos_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the tokenizer's EOS and the model's generation-config EOS (int or list)."""
    found: list[int] = []
    sources = [getattr(tokenizer, "eos_token_id", None),
               getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    for value in sources:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in found:
                found.append(v)
    return found
