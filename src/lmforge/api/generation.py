"""Generation through the public API: :func:`generate` for prompts, :func:`generate_file` for a
prompts file, and the one causal/seq2seq loader they share (re-exported by :mod:`lmforge.api`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from ..errors import LmforgeError


def generate(model: str | Path, prompts: str | Sequence[Any], *, adapter: str | None = None,
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, stop: Sequence[str] = (), seed: int | None = None,
             batch_size: int = 8, use_cache: bool = True, chat: bool | None = None, device: str = "auto",
             precision: str = "auto", stream=None) -> list[str]:
    """Completions of ``prompts`` (texts or chat message lists) by a causal LM (a model reference,
    a run directory, or a base with ``adapter=``); greedy unless ``temperature > 0``.
    ``chat`` None: the chat template when the tokenizer has one; ``stream(piece)`` receives the text
    of a single prompt as it is decoded."""
    from ..generation import GenerationConfig

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, stop=list(stop), seed=seed,
                           use_cache=use_cache, batch_size=batch_size)  # checked before the model loads
    return _generate_with(_load_lm(model, adapter, device, precision), prompts, cfg, chat, stream)


def _load_lm(model, adapter, device, precision):
    from ..causal_lm import load_causal_lm, resolve_source
    from ..device import Placement

    placement = Placement.resolve(device, precision)
    lm, tokenizer, _ = load_causal_lm(resolve_source(str(model), adapter), device=placement.device, seq2seq_ok=True)
    placement.for_inference(lm)  # bf16 weights when autocasting: no per-token weight casts while decoding
    return lm, tokenizer, placement


def _generate_with(loaded, prompts, cfg, chat=None, stream=None) -> list[str]:
    from ..generation import generate as _generate

    lm, tokenizer, placement = loaded
    with placement.autocast():
        return _generate(lm, tokenizer, prompts, cfg, chat=chat, stream=stream)


def read_prompts(path: str | Path) -> tuple[list[dict], list]:
    """The records of a prompts file and, per record, its ``messages`` (a chat) or ``prompt`` (text)."""
    from ..data.readers import read_table

    table = read_table(str(path))
    if not table.records:
        raise LmforgeError(f"{path}: no prompts (empty file)")
    prompts = []
    for i, rec in enumerate(table.records):
        if isinstance(rec.get("messages"), list) and rec["messages"]:
            prompts.append(rec["messages"])
        elif isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
            prompts.append(rec["prompt"])
        elif "prompt" in rec or "messages" in rec:
            raise LmforgeError(f"{table.where(i)}: 'prompt' must be non-empty text ('messages' a non-empty list)")
        else:
            raise LmforgeError(f"{table.where(i)}: missing 'prompt' (or 'messages') field")
    return table.records, prompts


def generate_file(model: str | Path, path: str | Path, out: str | Path, *, adapter: str | None = None,
                  chat: bool | None = None, device: str = "auto", precision: str = "auto", **decoding) -> dict:
    """Generate for every record of a prompts file (``prompt`` or ``messages``) and write each
    record plus its ``generation`` to ``out`` (JSONL); ``decoding`` as for :func:`generate`
    (``max_new_tokens``, ``temperature`` ...). Returns ``{generations, out, seconds}`` (seconds of
    generation, not loading)."""
    from ..generation import GenerationConfig
    from ..rundir import write_jsonl

    try:
        cfg = GenerationConfig(**decoding)  # checked before the model loads
    except TypeError as err:
        raise LmforgeError(f"generate: {err}") from None
    records, prompts = read_prompts(path)  # bad input fails before the model loads
    loaded = _load_lm(model, adapter, device, precision)
    t0 = time.perf_counter()
    texts = _generate_with(loaded, prompts, cfg, chat)
    seconds = time.perf_counter() - t0
    write_jsonl(out, [r | {"generation": t} for r, t in zip(records, texts)])
    return {"generations": len(texts), "out": str(out), "seconds": round(seconds, 3)}
