"""N sampled answers per prompt with their log-probabilities (lmforge's own generation loop).

Each answer is decoded by :func:`lmforge.generation.generate` (temperature / top-p / max tokens /
seed), then scored once more by the model: ``logprob = sum_t log p(y_t | x, y_<t)`` over the
answer's tokens as the chat formatter of the ``preference`` task encodes them (the answer and its
EOS), so the figure is the same log-probability DPO's policy term sees. Answers that decode to
empty text are dropped and counted.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..errors import LmforgeError

log = logging.getLogger(__name__)


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
                    batch_size: int = 8) -> list[tuple[float, int]]:
    """``(sum log-prob, token count)`` of each ``answers[i]`` after ``prompts[i]``.

    Rows are encoded with :class:`lmforge.data.chat.Formatter` (chat template when the tokenizer
    has one), right-padded, run through the decoder once per batch, and only the answer positions
    go through the LM head (:func:`lmforge.losses.lm.token_logps`, chunked):
    ``logp_i = sum_{t in answer} log softmax(W h_{t-1})[y_t]`` with hidden states ``h`` (B, T, H).
    """
    from ..data.chat import Formatter, next_token_targets
    from ..losses.lm import token_logps
    from ..tasks.causal import decoder_hidden, output_projection

    fmt = Formatter.create(tokenizer)
    rows = []
    for p, a in zip(prompts, answers):
        p_ids, c_ids, c_lab = fmt.encode_completion(p, a)
        rows.append((p_ids + c_ids, next_token_targets([-100] * len(p_ids) + c_lab)))
    device = next(model.parameters()).device
    weight, bias = output_projection(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[tuple[float, int]] = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T)
        tgt = torch.full((len(chunk), width), -100, dtype=torch.long)  # (B, T): token t+1 at position t
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (i, t) in enumerate(chunk):
            ids[r, :len(i)], tgt[r, :len(t)], mask[r, :len(i)] = torch.tensor(i), torch.tensor(t), 1
        hidden = decoder_hidden(model, ids.to(device), mask.to(device))  # (B, T, H)
        tgt = tgt.to(device)
        keep = tgt != -100  # (B, T)
        lp = token_logps(hidden[keep], weight, tgt[keep], bias=bias)  # (N,) answer positions only
        per_row = torch.zeros(len(chunk), dtype=lp.dtype, device=lp.device).index_add_(
            0, keep.nonzero()[:, 0], lp)  # (B,)
        out += [(float(v), int(n)) for v, n in zip(per_row.tolist(), keep.sum(1).tolist())]
    return out


def sample_answers(model, tokenizer, prompts: Sequence[dict], n: int, *, temperature: float = 1.0, top_p: float = 0.95,
                   max_new_tokens: int = 48, seed: int = 0, batch_size: int = 8) -> tuple[list[dict], int]:
    """``n`` sampled answers for each prompt record (``{"id", "prompt", ...}``).

    Sample ``k`` of every prompt is drawn in pass ``k`` with seed ``seed + k``. Returns ``(rows, dropped_empty)``; each row is the prompt record
    plus ``sample`` (k), ``answer``, ``logprob`` and ``answer_tokens``.
    """
    from ..generation import GenerationConfig, generate

    if n < 1:
        raise LmforgeError(f"n must be >= 1, got {n}")
    if temperature <= 0:
        raise LmforgeError(f"sampling needs temperature > 0, got {temperature}")
    texts = [r["prompt"] for r in prompts]
    rows, dropped = [], 0
    model.eval()
    for k in range(n):
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               seed=seed + k, batch_size=batch_size)
        answers = [a.strip() for a in generate(model, tokenizer, texts, cfg)]
        keep = [i for i, a in enumerate(answers) if a]
        dropped += len(answers) - len(keep)
        scores = answer_logprobs(model, tokenizer, [texts[i] for i in keep], [answers[i] for i in keep],
                                 batch_size=batch_size)
        for i, (lp, nt) in zip(keep, scores):
            rows.append((i, k, prompts[i] | {"sample": k, "answer": answers[i], "logprob": round(lp, 4), "answer_tokens": nt}))
        log.info("sample pass %d/%d: %d answers", k + 1, n, len(keep))
    rows = [r for _, _, r in sorted(rows, key=lambda t: (t[0], t[1]))]  # prompt order, then sample
    if dropped:
        log.warning("%d empty answers dropped", dropped)
    return rows, dropped


def greedy_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48, batch_size: int = 8) -> list[str]:
    """The greedy answer of each prompt (stripped)."""
    from ..generation import GenerationConfig, generate

    model.eval()
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    return [a.strip() for a in generate(model, tokenizer, list(prompts), cfg)]
