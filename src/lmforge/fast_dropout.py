"""Dropout whose mask costs less on CPU: 16 random bits per element instead of a Bernoulli draw.

    y = x * keep / (1 - p'),     keep_i = [r_i >= k - 2^15],   k = round(p * 2^16),   p' = k / 2^16

with ``r_i`` uniform on the int16 range (four per 64-bit draw of the default generator, so seeded
runs repeat exactly). ``P(keep_i = 0) = p'`` (``p`` rounded to 2^-16: 0.1 -> 0.1000061) and the
scale uses ``p'``, so ``E[y] = x`` exactly. The backward is ``dy * keep / (1 - p')`` from the saved
boolean mask (1 byte per element, as ``torch.nn.functional.dropout`` saves).

Why: on CPU torch's dropout draws one Bernoulli per element (measured 1.6M elements, 1 thread:
13.4 ms forward + backward against 5.7 ms here); in MiniLM training steps dropout took about a
quarter of the step. Elsewhere (CUDA: a fused kernel) :func:`dropout` is torch's own.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

BITS = 16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> tuple[Tensor, float]:
    """A boolean keep mask of ``shape`` with ``P(False) = round(p * 2^16) / 2^16`` and that ``p'``."""
    k = round(p * 2 ** BITS)
    numel = 1
    for s in shape:
        numel *= s
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((numel + 3) // 4,), dtype=torch.int64, device=device)
    r = words.view(torch.int16)[:numel]  # (numel,) uniform int16
    return (r >= k - 2 ** (BITS - 1)).view(shape), k / 2 ** BITS


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.mul(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Drop-in for ``torch.nn.functional.dropout`` (not in place); the fast mask on CPU only."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or not x.is_floating_point():
        return F.dropout(x, p, training)
    keep, p_q = keep_mask(x.shape, p, x.device)
    if p_q >= 1.0:
        return x * 0.0
    return _Dropout.apply(x, keep, 1.0 / (1.0 - p_q))


class FastDropout(nn.Dropout):
    """``nn.Dropout`` running :func:`dropout` (same ``p``, no parameters, same state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)


def enable_fast_dropout(model: nn.Module) -> int:
    """Swap every plain ``nn.Dropout`` in ``model`` to :class:`FastDropout` (in place, idempotent;
    ``p`` and ``training`` kept). Returns how many were swapped."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Dropout:
            m.__class__ = FastDropout
            n += 1
    return n


def disable_fast_dropout(model: nn.Module) -> None:
    """Undo :func:`enable_fast_dropout`."""
    for m in model.modules():
        if type(m) is FastDropout:
            m.__class__ = nn.Dropout
