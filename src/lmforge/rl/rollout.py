"""Rollouts: sample responses with the policy, lay them out for training, score their tokens.

A rollout sample is a prompt (token ids) and the response the policy sampled for it. For the
loss both are one right-padded row ``prompt + response`` (the causal mask needs no attention
mask: padding only follows real tokens), and the hidden state that predicts response token ``j``
sits at position ``len(prompt) - 1 + j``. :func:`collate_rollout` builds that index, the response
mask and the per-token rollout tensors (old/reference log-probs, values, advantages, returns);
:func:`response_logps` turns gathered hidden states into log-probs and entropies.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..generation import GenerationConfig, decode

#: per-token float fields of a rollout item (1-D tensors as long as the response), padded with 0
TOKEN_FIELDS = ("old_logps", "ref_logps", "values", "advantages", "returns")


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded ``(B, T)`` ids and attention mask of token lists (for :func:`decode`)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        mask[r, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def sample_responses(model, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, *, eos_ids: Sequence[int],
                     pad_id: int, generator: torch.Generator | None) -> list[list[int]]:
    """Sample one response per prompt (token ids, the EOS kept when hit), ``cfg.batch_size``
    prompts at a time in input order, all draws from ``generator`` (seeded by the caller: the same
    seed and weights give the same responses)."""
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prompts), cfg.batch_size):
        ids, mask = left_pad(prompts[start:start + cfg.batch_size], pad_id)
        out += decode(model, ids.to(device), mask.to(device), cfg, eos_ids=eos_ids, pad_id=pad_id,
                      generator=generator)
    return out


def collate_rollout(items: Sequence[dict], pad_id: int, decoder_start: int | None = None) -> dict[str, Tensor]:
    """Rollout items -> training tensors.

    With ``decoder_start`` (encoder-decoder policies) the prompt is the encoder input and the
    response the decoder's: ``input_ids``/``attention_mask`` (B, S) are the right-padded prompts,
    ``decoder_input_ids`` (B, L) = ``[start, r_0 .. r_{L-2}]`` and ``response_index[:, j] = j``.

    Items hold ``prompt_ids`` and ``response_ids`` (lists), optional per-token tensors
    (:data:`TOKEN_FIELDS`, each ``(L_i,)``), optional per-sequence ``advantage`` (float).

    Returns:
        ``input_ids`` (B, T) right-padded ``prompt + response``; ``response_index`` (B, L): the
        position whose hidden state predicts response token j (0 on padding); ``response_ids``
        (B, L); ``response_mask`` (B, L) float; each present token field (B, L) float, 0 on
        padding; ``advantage`` (B,) when given per sequence.
    """
    lengths = [len(it["response_ids"]) for it in items]
    L = max(max(lengths), 1)
    B = len(items)
    if decoder_start is not None:
        batch = _collate_seq2seq(items, lengths, L, pad_id, decoder_start)
        return _token_fields(batch, items, lengths, L)
    width = max(len(it["prompt_ids"]) + n for it, n in zip(items, lengths))
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    index = torch.zeros((B, L), dtype=torch.long)
    resp = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L))
    for r, (it, n) in enumerate(zip(items, lengths)):
        p = len(it["prompt_ids"])
        seq = list(it["prompt_ids"]) + list(it["response_ids"])
        input_ids[r, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        if n:
            index[r, :n] = torch.arange(p - 1, p - 1 + n)
            resp[r, :n] = torch.as_tensor(list(it["response_ids"]), dtype=torch.long)
            mask[r, :n] = 1.0
    batch = {"input_ids": input_ids, "response_index": index, "response_ids": resp, "response_mask": mask}
    return _token_fields(batch, items, lengths, L)


def _collate_seq2seq(items, lengths, L: int, pad_id: int, start: int) -> dict[str, Tensor]:
    B, S = len(items), max(len(it["prompt_ids"]) for it in items)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention = torch.zeros((B, S), dtype=torch.long)
    resp = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L))
    for r, (it, n) in enumerate(zip(items, lengths)):
        p = len(it["prompt_ids"])
        input_ids[r, :p] = torch.as_tensor(list(it["prompt_ids"]), dtype=torch.long)
        attention[r, :p] = 1
        if n:
            resp[r, :n] = torch.as_tensor(list(it["response_ids"]), dtype=torch.long)
            mask[r, :n] = 1.0
    dec = torch.cat([torch.full((B, 1), start, dtype=torch.long), resp[:, :-1]], dim=1)  # (B, L)
    return {"input_ids": input_ids, "attention_mask": attention, "decoder_input_ids": dec,
            "response_index": torch.arange(L).expand(B, L).contiguous(), "response_ids": resp, "response_mask": mask}


def _token_fields(batch: dict, items, lengths, L: int) -> dict[str, Tensor]:
    B = len(items)
    for f in TOKEN_FIELDS:
        if f in items[0]:
            t = torch.zeros((B, L))
            for r, (it, n) in enumerate(zip(items, lengths)):
                t[r, :n] = it[f][:n]
            batch[f] = t
    if "advantage" in items[0]:
        batch["advantage"] = torch.tensor([float(it["advantage"]) for it in items])  # (B,)
    return batch


def gather_response(hidden: Tensor, index: Tensor) -> Tensor:
    """Hidden states at the positions that predict the response tokens. (B, T, H), (B, L) -> (B, L, H)."""
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


def response_logps(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                   with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs of the response tokens and (optionally) the token entropies.

    ``logits = h @ W.T + b`` in fp32 (only the response positions: ``B * L`` rows, not the whole
    sequence), ``logp_t = log_softmax(logits_t)[y_t]``, ``H_t = -sum_v p_tv log p_tv``.

    Args:
        h: (B, L, H) hidden states at the response positions (:func:`gather_response`).
        weight: (V, H) LM head; bias: (V,) or None.
        targets: (B, L) response token ids.

    Returns:
        ``(logps (B, L), entropy (B, L) or None)``, fp32.
    """
    logits = (h @ weight.T.to(h.dtype)).float()  # (B, L, V)
    if bias is not None:
        logits = logits + bias.float()
    logp_all = torch.log_softmax(logits, dim=-1)  # (B, L, V)
    logps = logp_all.gather(-1, targets[..., None]).squeeze(-1)  # (B, L)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B, L)
    return logps, entropy


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over ``texts`` (0 when none)."""
    grams = [tuple(w[i:i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
