"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, eq. (5)).

    W' = m * (W0 + s B A) / ||W0 + s B A||_c          m: (out,), initialised to ||W0||_c

``||.||_c`` is the norm of each output row (peft's convention for ``nn.Linear``); the norm is
treated as a constant in backward (paper section 4.3, as peft does). With the base output
``y0 = W0 x + b`` and ``g = m / ||W0 + s B A||_c``:

    y = g * (W0 x) + b + g * s * B A x = y0 + (g - 1) * (y0 - b) + g * s * B A x

Fast path (dropout 0, or eval): ``W0 x`` is the base output already computed, so no second
pass over the base weight; and the row norm is computed without forming ``W0 + s B A``:

    ||W0_i + s (BA)_i||^2 = ||W0_i||^2 + 2 s <B_i, (W0 A^T)_i> + s^2 B_i (A A^T) B_i^T

(``||W0_i||^2`` cached; ``W0 A^T`` is an (out, r) product). With dropout > 0 in training,
``W0 dropout(x)`` needs its own pass, as in peft. Saved as peft's LoRA with ``use_dora``,
the magnitude under ``<path>.lora_magnitude_vector``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.adapters.lora import LoraKind, LoraLinear, LoraSpec
from lmforge.adapters.registry import register_adapter


@dataclass
class DoraSpec(LoraSpec):
    """DoRA's options: LoRA's (``r``, ``alpha``, ``dropout``, ``target_modules``, ``use_rslora``,
    ``modules_to_save``); the magnitude vector is added to every target."""


class DoraLinear(LoraLinear):
    """LoRA plus a learned magnitude per output row (see the module docstring)."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 *, use_rslora: bool = False):
        super().__init__(base, r, alpha, dropout, use_rslora=use_rslora)
        with torch.no_grad():
            norm = self._w0().float().norm(dim=1)  # (out,) = ||W0||_c, so step 0 equals the base
        self.lora_magnitude_vector = nn.Parameter(norm.to(device=self.lora_A.weight.device))
        self._w0_sq: tuple | None = None  # cached (version, ptr, ||W0_i||^2)
        self.register_buffer("_merged_norm", None, persistent=False)

    def _w0(self) -> torch.Tensor:
        deq = getattr(self.base, "dequantize", None)
        return deq() if callable(deq) else self.base.weight  # (out, in)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``||W0 + s B A||_c`` (out,) in float32, without forming the (out, in) sum."""
        w0 = self._w0()
        a, b, s = self.lora_A.weight.float(), self.lora_B.weight.float(), self.scale  # (r, in), (out, r)
        key = (w0._version, w0.data_ptr(), w0.dtype)
        if self._w0_sq is None or self._w0_sq[0] != key:
            self._w0_sq = (key, w0.float().pow(2).sum(1))  # (out,)
        w0a = (w0 @ a.T.to(w0.dtype)).float()  # (out, r)
        sq = self._w0_sq[1] + 2 * s * (b * w0a).sum(1) + s * s * ((b @ (a @ a.T)) * b).sum(1)  # (out,)
        return sq.clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out) = W0 x + b
        if self.disabled or self.merged:
            return y
        g = self.lora_magnitude_vector / self.weight_norm()  # (out,)
        xa = self._lora_input(x)
        a = self.lora_A(xa)  # (..., r)
        bias = getattr(self.base, "bias", None)
        if self.lora_dropout is None or not self.training:
            # fast path: z = W0 x + s B A x from the base output, then y' = g * z + b
            w0x = y if bias is None else y - bias  # (..., out)
            if a.dtype == y.dtype:  # one GEMM adds s * a @ B.T
                z = torch.addmm(w0x.reshape(-1, w0x.shape[-1]), a.reshape(-1, a.shape[-1]), self.lora_B.weight.T,
                                alpha=self.scale).view(y.shape)
            else:
                z = w0x + (self.lora_B(a) * self.scale).to(y.dtype)
            g = g.to(z.dtype)
            return z * g if bias is None else torch.addcmul(bias.to(z.dtype), z, g)
        w0x = F.linear(xa.to(y.dtype), self._w0().to(y.dtype))  # second pass: W0 dropout(x)
        out = y + ((g - 1) * w0x + g * self.scale * self.lora_B(a))  # (..., out)
        return out.to(y.dtype)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return super().adapter_tensors() | {"lora_magnitude_vector": self.lora_magnitude_vector}

    @torch.no_grad()
    def _shift(self, sign: float) -> None:
        weight = self.base_weight()  # (out, in)
        if sign > 0:
            norm = self.weight_norm()  # (out,)
            self._merged_norm = norm
            g = (self.lora_magnitude_vector.float() / norm)[:, None]  # (out, 1)
            weight.copy_((g * (weight.float() + self.delta_weight())).to(weight.dtype))
        else:
            g = (self.lora_magnitude_vector.float() / self._merged_norm)[:, None]
            weight.copy_((weight.float() / g - self.delta_weight()).to(weight.dtype))
            self._merged_norm = None
        self._w0_sq = None


class DoraKind(LoraKind):
    name = "dora"
    label = "DoRA"
    spec_cls = DoraSpec
    layer_cls = DoraLinear
    use_dora = True


register_adapter(DoraKind())
