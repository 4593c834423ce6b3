"""Language-model losses that never materialise the full ``(B, T, V)`` fp32 logits.

A causal LM's last step is ``logits = hidden @ weight.T (+ bias)``. Over a batch of
``N = B * T`` positions and a vocabulary of ``V`` tokens those logits cost ``4 * N * V``
bytes in fp32 (1 GiB for 2 x 1024 tokens of a 128k vocabulary), and autograd keeps them
alive until backward. The functions here walk the rows in chunks of ``chunk_size`` and
only ever hold one ``(chunk_size, V)`` fp32 logits tile, so peak memory is
``O(chunk_size * V)`` instead of ``O(N * V)``. Rows whose label is ``ignore_index``
(prompt tokens, padding) are skipped entirely: they cost no FLOPs.

Inputs are *aligned*: ``hidden[..., t, :]`` is scored against ``labels[..., t]``. For a
causal LM, build the labels with :func:`shift_labels` so position ``t`` predicts token
``t + 1``.

Precision: the projection runs in the autocast dtype when autocast is on, otherwise in
``weight.dtype``; each logits tile is upcast to fp32 (fp64 stays fp64) before the
softmax, and weight gradients are accumulated in that precision. Gradients come back in
the inputs' dtypes.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["chunked_cross_entropy", "sequence_logps", "shift_labels", "token_logps"]


def shift_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Shift labels left by one so that position ``t`` predicts token ``t + 1``.

    ``out[..., t] = labels[..., t + 1]`` and ``out[..., -1] = ignore_index``.

    Args:
        labels: ``(B, T)`` or ``(T,)`` token ids (already ``ignore_index`` where not scored).
        ignore_index: value for the last position, which has no next token.

    Returns:
        Tensor of the same shape and dtype as ``labels``.
    """
    out = labels.new_full(labels.shape, ignore_index)  # (B, T)
    out[..., :-1] = labels[..., 1:]
    return out


def _compute_dtype(device: torch.device, weight: Tensor) -> torch.dtype:
    """The dtype autocast would run the projection in (``weight.dtype`` without autocast)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


def _logits_tile(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """Logits of one chunk, upcast to (at least) fp32: ``h @ w.T + b``; ``h`` (C, H), ``w`` (V, H) -> (C, V)."""
    acc = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    logits = (h @ w.T).to(acc)  # (C, V)
    if b is not None:
        logits += b.to(acc)
    return logits


def _flatten(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} are not aligned: "
            "expected hidden of shape (*labels.shape, H)"
        )
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum (times ``scale``) of token cross-entropies; gradients are computed in forward.

    For each chunk of valid rows: ``p = softmax(logits)`` (from one fused ``log_softmax``),
    ``g = p - onehot(y)``, ``dL/dh = scale * g @ W``, ``dL/dW += scale * g.T @ h``,
    ``dL/db += scale * sum(g)`` (the scale goes on the small products, not the ``(C, V)`` tile). Backward only
    multiplies the stored gradients by the incoming scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk_size, scale_by_count, needs):
        need_h, need_w, need_b = needs
        cdtype = _compute_dtype(hidden.device, weight)
        w = weight.to(cdtype)  # (V, H), no copy in the usual case
        rows = (labels != ignore_index).nonzero().squeeze(1)  # (M,)
        n_valid = rows.numel()
        scale = 1.0 / max(n_valid, 1) if scale_by_count else 1.0
        grad_h = torch.zeros_like(hidden) if need_h else None  # (N, H)
        acc = torch.promote_types(cdtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_valid, chunk_size):
                idx = rows[start : start + chunk_size]  # (C,)
                h = hidden.index_select(0, idx).to(cdtype)  # (C, H)
                y = labels.index_select(0, idx)  # (C,)
                logp = torch.log_softmax(_logits_tile(h, w, bias), dim=-1)  # (C, V) fp32, one fused pass
                total -= logp.gather(1, y[:, None]).sum()
                if not (need_h or need_w or need_b):
                    continue
                g = logp.exp_()  # (C, V) softmax, in place
                g[torch.arange(idx.numel(), device=g.device), y] -= 1.0  # p - onehot(y)
                if need_b:
                    grad_b.add_(g.sum(0), alpha=scale)
                g_c = g.to(cdtype)  # (C, V); the scale is applied to the (C, H) / (V, H) products
                if need_h:
                    grad_h.index_copy_(0, idx, (g_c @ w).mul_(scale).to(hidden.dtype))  # (C, H)
                if need_w:
                    grad_w.add_(g_c.T @ h, alpha=scale)  # (V, H)
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.grads
        scaled = [None if g is None else g * grad_out.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return scaled[0], scaled[1], scaled[2], None, None, None, None, None


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    reduction: str = "sum",
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, chunk by chunk.

    ``L = sum_{t: y_t != ignore} [logsumexp_v(z_{t,v}) - z_{t, y_t}]`` with
    ``z_t = W h_t + b``; ``reduction="mean"`` divides by the number of scored tokens
    (``F.cross_entropy`` semantics, except that an all-ignored batch gives 0, not NaN).

    The gradients w.r.t. ``hidden``, ``weight`` and ``bias`` are computed during the
    forward pass (one tile at a time), so backward is a scalar multiply and memory is
    ``O(chunk_size * V)``. Gradients are only computed for inputs that require them
    (e.g. a frozen ``lm_head`` under LoRA gets none).

    Args:
        hidden: ``(B, T, H)`` or ``(N, H)`` final hidden states, aligned with ``labels``.
        weight: ``(V, H)`` output projection (``lm_head.weight``).
        labels: ``(B, T)`` or ``(N,)`` target ids, ``ignore_index`` where not scored.
        bias: optional ``(V,)`` output bias.
        ignore_index: label value that is not scored.
        chunk_size: rows per logits tile.
        reduction: ``"sum"`` or ``"mean"`` over scored tokens.

    Returns:
        0-dim tensor, fp32 (fp64 for fp64 inputs).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    h2, y = _flatten(hidden, labels)  # (N, H), (N,)
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return _ChunkedCrossEntropy.apply(h2, weight, bias, y, ignore_index, int(chunk_size), reduction == "mean", needs)


class _TokenLogps(torch.autograd.Function):
    """Per-row ``log p(y_t | h_t)``; backward recomputes each logits tile.

    Forward keeps only the per-row log-normaliser ``lse`` (N floats). Backward, with
    upstream ``go_t``: ``g = go_t * (onehot(y_t) - exp(z_t - lse_t))``, then
    ``dh = g @ W``, ``dW += g.T @ h``, ``db += sum(g)``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk_size):
        cdtype = _compute_dtype(hidden.device, weight)
        w = weight.to(cdtype)  # (V, H)
        rows = (labels != ignore_index).nonzero().squeeze(1)  # (M,)
        acc = torch.promote_types(cdtype, torch.float32)
        out = torch.zeros(labels.shape, dtype=acc, device=hidden.device)  # (N,)
        lse_all = torch.zeros(rows.shape, dtype=acc, device=hidden.device)  # (M,)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, rows.numel(), chunk_size):
                idx = rows[start : start + chunk_size]  # (C,)
                y = labels.index_select(0, idx)  # (C,)
                logits = _logits_tile(hidden.index_select(0, idx).to(cdtype), w, bias)  # (C, V)
                z_y = logits.gather(1, y[:, None]).squeeze(1)  # (C,)
                logp_y = torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)  # (C,)
                lse_all[start : start + idx.numel()] = z_y - logp_y  # log-normaliser
                out.index_copy_(0, idx, logp_y)
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse_all)
        ctx.cdtype = cdtype
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, rows, lse_all = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdtype, chunk_size = ctx.cdtype, ctx.chunk_size
        w = weight.to(cdtype)  # (V, H)
        grad_h = torch.zeros_like(hidden) if need_h else None  # (N, H)
        acc = lse_all.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, rows.numel(), chunk_size):
                idx = rows[start : start + chunk_size]  # (C,)
                go = grad_out.index_select(0, idx).to(acc)  # (C,)
                h = hidden.index_select(0, idx).to(cdtype)  # (C, H)
                logits = _logits_tile(h, w, bias)  # (C, V)
                lse = lse_all[start : start + idx.numel()]  # (C,)
                g = logits.sub_(lse[:, None]).exp_().mul_(-go[:, None])  # (C, V) = -go * p
                g[torch.arange(idx.numel(), device=g.device), labels.index_select(0, idx)] += go
                if need_b:
                    grad_b += g.sum(0)
                g_c = g.to(cdtype)
                if need_h:
                    grad_h.index_copy_(0, idx, (g_c @ w).to(hidden.dtype))  # (C, H)
                if need_w:
                    grad_w += g_c.T @ h  # (V, H)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


def token_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> Tensor:
    """Per-token log-probabilities ``log softmax(W h_t + b)[y_t]``, 0 where ignored.

    Args:
        hidden: ``(B, T, H)`` (or ``(N, H)``) hidden states aligned with ``labels``.
        weight: ``(V, H)`` output projection.
        labels: ``(B, T)`` (or ``(N,)``) target ids, ``ignore_index`` where not scored.
        bias: optional ``(V,)`` output bias.
        ignore_index: label value that is not scored.
        chunk_size: rows per logits tile (memory ``O(chunk_size * V)``).

    Returns:
        Tensor shaped like ``labels``, fp32 (fp64 for fp64 inputs).
    """
    h2, y = _flatten(hidden, labels)  # (N, H), (N,)
    out = _TokenLogps.apply(h2, weight, bias, y, ignore_index, int(chunk_size))  # (N,)
    return out.view(labels.shape)


def sequence_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    return_counts: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sum of the label log-probabilities of each sequence (the DPO/ORPO policy score).

    ``logp(y | x) = sum_{t: y_t != ignore} log softmax(W h_t + b)[y_t]``, computed with
    :func:`token_logps` (chunked; backward recomputes one tile at a time).

    Args:
        hidden: ``(B, T, H)`` hidden states aligned with ``labels`` (see :func:`shift_labels`).
        weight: ``(V, H)`` output projection.
        labels: ``(B, T)`` target ids, ``ignore_index`` on prompt and padding positions.
        bias: optional ``(V,)`` output bias.
        ignore_index: label value that is not scored.
        chunk_size: rows per logits tile.
        return_counts: also return the number of scored tokens per sequence.

    Returns:
        ``logps`` ``(B,)`` fp32 (fp64 for fp64 inputs); with ``return_counts`` also ``counts`` int64 ``(B,)``
        (divide to get the length-averaged log-prob that ORPO and IPO use).
    """
    if hidden.dim() != 3:
        raise ValueError(f"sequence_logps expects hidden of shape (B, T, H), got {tuple(hidden.shape)}")
    per_token = token_logps(
        hidden, weight, labels, bias=bias, ignore_index=ignore_index, chunk_size=chunk_size
    )  # (B, T)
    logps = per_token.sum(-1)  # (B,)
    if return_counts:
        return logps, (labels != ignore_index).sum(-1)
    return logps
