"""Logits processors as pure tensor functions: which tokens a row has seen, the CTRL repetition
penalty, temperature, top-k and top-p (nucleus) filtering, the allowed-token mask of constrained
decoding. ``generation.py`` chains them."""
from __future__ import annotations

import torch
from torch import Tensor


def seen_tokens(input_ids: Tensor, attention_mask: Tensor, vocab_size: int) -> Tensor:
    """Which vocabulary entries occur in each row (padding excluded).

    Args:
        input_ids: (B, T) token ids.
        attention_mask: (B, T), 1 on real tokens, 0 on padding.
        vocab_size: V.

    Returns:
        (B, V) bool.
    """
    counts = torch.zeros(input_ids.shape[0], vocab_size, device=input_ids.device)  # (B, V)
    counts.scatter_add_(1, input_ids, attention_mask.to(counts.dtype))
    return counts > 0


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL repetition penalty: ``z'_v = z_v / θ if z_v > 0 else z_v θ`` for seen ``v``.

    Args:
        logits: (B, V) next-token logits.
        seen: (B, V) bool, tokens already in the row.
        penalty: θ > 0 (θ > 1 makes repeats less likely, 1 is a no-op).

    Returns:
        (B, V) logits.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)  # (B, V)
    return torch.where(seen, penalised, logits)


def temperature_scale(logits: Tensor, temperature: float) -> Tensor:
    """``z / T`` (T > 0): T < 1 sharpens the distribution, T > 1 flattens it. (B, V) -> (B, V)."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use greedy decoding for 0)")
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to ``-inf`` (ties at the k-th value kept).

    Args:
        logits: (B, V).
        k: tokens kept; 0 or k >= V is a no-op.

    Returns:
        (B, V).
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sum reaches ``p``.

    With tokens sorted by probability ``π_(1) >= π_(2) >= ...``, token ``(i)`` is dropped when
    ``sum_{j < i} π_(j) >= p`` (the tokens before it already hold mass ``p``); the most likely
    token is always kept.

    Args:
        logits: (B, V).
        p: in (0, 1]; 1 is a no-op.

    Returns:
        (B, V) with dropped tokens at ``-inf``.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.float().softmax(dim=-1)  # (B, V)
    before = probs.cumsum(dim=-1) - probs  # (B, V) mass strictly before each token
    drop_sorted = before >= p  # (B, V)
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def mask_disallowed(logits: Tensor, allowed: Tensor) -> Tensor:
    """Constrained decoding: ``z'_v = z_v`` where ``allowed[b, v]``, ``-inf`` elsewhere.

    Args:
        logits: (B, V).
        allowed: (B, V) bool; a row with no allowed token would become all ``-inf`` (the caller
            guarantees at least one, e.g. EOS).

    Returns:
        (B, V).
    """
    return logits.masked_fill(~allowed, float("-inf"))
