"""4-bit NormalFloat (NF4) base weights in a model (QLoRA): ``Linear4bit`` and the swaps.

The format (Dettmers et al. 2023, Sec. 3: NF4 codes per block of 64 elements scaled by the
block absmax, absmaxes double-quantised to int8 per 256; ~4.127 bits per weight) is
:mod:`lmforge.quant.nf4_codec`, re-exported here. The weights are frozen: ``Linear4bit``
dequantises them on the fly in each forward (and again in backward, so no full-precision weight
is kept alive between them). ``quantize_model`` / ``dequantize_model`` swap every ``nn.Linear``
of a model for ``Linear4bit`` and back.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.quant.nf4_codec import NF4_CODE, NF4Weight, check_sizes, dequantize_nf4, quantize_nf4

__all__ = [
    "NF4_CODE",
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4",
    "Linear4bit",
    "quantize_model",
    "dequantize_model",
    "nf4_weight_bytes",
]


class _NF4Linear(torch.autograd.Function):
    """``y = x W_hat^T + b``; backward re-dequantises instead of saving ``W_hat``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, q: NF4Weight) -> torch.Tensor:
        ctx.q = q
        return F.linear(x, dequantize_nf4(q, x.dtype), bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_nf4(ctx.q, grad_out.dtype)  # (..., out) @ (out, in) -> (..., in)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (out,)
        return grad_x, grad_bias, None


class Linear4bit(nn.Module):
    """A frozen NF4 linear layer: ``y = x W_hat^T + b``.

    The quantised weight lives in buffers (``codes`` uint8, ``scale_codes`` int8, and
    ``scale_scales``/``scale_offset`` stored as the int32 bit patterns of fp32 values so
    that ``module.to(dtype)`` cannot round them); ``.to(device)`` and ``state_dict``
    handle them like any buffer. Only the optional bias is a Parameter.

    Attributes:
        in_features, out_features: as in ``nn.Linear``.
        compute_dtype: default dtype of ``dequantize()``; follows ``module.to(dtype)``.
            ``forward`` computes in the input's dtype (or the autocast dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: int = 64,
        scale_block_size: int = 256,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        check_sizes(block_size, scale_block_size)
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.scale_block_size = scale_block_size
        self.compute_dtype = compute_dtype
        n_blocks = -(-in_features * out_features // block_size)
        n_scale_blocks = -(-n_blocks // scale_block_size)
        self.register_buffer("codes", torch.zeros(n_blocks * block_size // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "scale_codes", torch.zeros(n_scale_blocks * scale_block_size, dtype=torch.int8, device=device)
        )
        self.register_buffer("scale_scales", torch.zeros(n_scale_blocks, dtype=torch.int32, device=device))
        self.register_buffer("scale_offset", torch.zeros((), dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, scale_block_size: int = 256) -> "Linear4bit":
        """Quantise an ``nn.Linear`` (weight frozen, bias kept as a Parameter)."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            block_size=block_size,
            scale_block_size=scale_block_size,
            compute_dtype=w.dtype,
            device=w.device,
        )
        layer.load_nf4(quantize_nf4(w, block_size, scale_block_size))
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    @torch.no_grad()
    def load_nf4(self, q: NF4Weight) -> None:
        """Copy a quantised weight of this layer's shape into the buffers."""
        if q.shape != (self.out_features, self.in_features) or q.block_size != self.block_size:
            raise LmforgeError(
                f"NF4 weight {q.shape}/block {q.block_size} does not fit layer "
                f"({self.out_features}, {self.in_features})/block {self.block_size}"
            )
        self.codes.copy_(q.codes)
        self.scale_codes.copy_(q.scale_codes)
        self.scale_scales.copy_(q.scale_scales.float().view(torch.int32))
        self.scale_offset.copy_(q.scale_offset.float().view(torch.int32))

    @property
    def nf4(self) -> NF4Weight:
        """The buffers viewed as an ``NF4Weight`` (no copy)."""
        return NF4Weight(
            codes=self.codes,
            scale_codes=self.scale_codes,
            scale_scales=self.scale_scales.view(torch.float32),
            scale_offset=self.scale_offset.view(torch.float32),
            shape=(self.out_features, self.in_features),
            dtype=self.compute_dtype,
            block_size=self.block_size,
            scale_block_size=self.scale_block_size,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantised weight, (out, in), in ``dtype`` (default ``compute_dtype``)."""
        return dequantize_nf4(self.nf4, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (..., in). Returns: (..., out) in x's dtype (or the autocast dtype)."""
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _NF4Linear.apply(x, bias, self.nf4)  # (..., out)

    def _apply(self, fn, recurse=True):
        # Track module.to(dtype)/.half()/.float() in compute_dtype; integer buffers are untouched.
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, block_size={self.block_size}, compute_dtype={self.compute_dtype}"
        )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(
    model: nn.Module,
    *,
    skip: tuple[str, ...] = ("lm_head", "score", "classifier"),
    block_size: int = 64,
) -> list[str]:
    """Replace every ``nn.Linear`` by ``Linear4bit`` in place.

    Only exact ``nn.Linear`` instances are replaced: subclasses (e.g. the ``out_proj``
    of ``nn.MultiheadAttention``) are read through ``.weight`` by their owners.

    Args:
        model: any module tree.
        skip: a Linear whose qualified name ends with one of these (as a whole name
            component) keeps full precision.
        block_size: NF4 absmax block size.

    Returns:
        Qualified names of the replaced modules, in ``named_modules`` order.
    """
    if isinstance(model, nn.Linear):
        raise LmforgeError("quantize_model needs a container module; use Linear4bit.from_linear for a bare Linear")
    targets = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and not any(name == s or name.endswith("." + s) for s in skip)
    ]
    for name in targets:
        _set_submodule(model, name, Linear4bit.from_linear(model.get_submodule(name), block_size=block_size))
    return targets


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every ``Linear4bit`` (including a wrapper's ``base``) by an ``nn.Linear``.

    The new weight is ``dequantize(dtype)`` and stays frozen (``requires_grad=False``)
    as it was; the bias keeps its ``requires_grad``.

    Returns:
        Number of replaced modules.
    """
    targets = [name for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name in targets:
        q = model.get_submodule(name)
        linear = nn.Linear(
            q.in_features, q.out_features, bias=q.bias is not None, dtype=dtype, device=q.codes.device
        )
        linear.weight.copy_(q.dequantize(dtype))
        linear.weight.requires_grad_(False)
        if q.bias is not None:
            linear.bias.copy_(q.bias)
            linear.bias.requires_grad_(q.bias.requires_grad)
        _set_submodule(model, name, linear)
    return len(targets)


def nf4_weight_bytes(model: nn.Module) -> int:
    """Bytes of all quantised weights in ``model`` (codes + scales, padding included)."""
    return sum(m.nf4.nbytes for m in model.modules() if isinstance(m, Linear4bit))
