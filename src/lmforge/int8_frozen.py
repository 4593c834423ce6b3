"""int8 products for the frozen linear layers of an adapter run (``precision: int8``, CPU).

Training LoRA (or a head) on an encoder leaves every base linear layer frozen: each training step
still runs their forward products (and their input gradients). On a CPU with VNNI an int8 x int8
-> int32 GEMM runs ~3.8x the fp32 rate (measured here: ~700 vs 185 GOP/s per core), so
:class:`Int8FrozenLinear` computes the forward as :func:`lmforge.fast_encode.int8_product`:

    y = (s_x q_x)(diag(s_w) q_W)^T + b      q_x: x quantised per row (token), q_W per output row

and the input gradient the same way (as SwitchBack does, Wortsman et al. 2023: row-wise int8 for
the forward and input-gradient products):

    dL/dx = (s_g q_g)(q_Wt^T diag(s_wt))     q_g: dL/dy per row, q_Wt: W^T per row (W's columns)

The weight is frozen: no weight gradient (the adapters' and head's stay fp32). Relative error ~0.5 %
per product (MiniLM sentence vectors at cosine >= 0.995 with fp32's, ``tests/speed/test_int8_encode.py``;
input gradients at cosine >= 0.99, ``tests/speed/test_int8_frozen.py``). The fp32 weight stays the module's parameter (state dicts,
merging, saving are unchanged); the codes are a non-persistent buffer, made again when the weight
tensor changes (an in-place update bumps its version). Inference of the same model (evaluation,
``predict``) runs the int8 products too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cpu_kernels import quant_rows
from .fast_encode import int8_product


class _Int8Product(torch.autograd.Function):
    """``x (N, in) -> x W^T + b`` and ``dL/dx = dL/dy W``, both through int8 codes (see the module)."""

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor, codes_t: Tensor, scale_t: Tensor,
                zeros: Tensor) -> Tensor:
        ctx.save_for_backward(codes_t, scale_t, zeros)
        return int8_product(x.detach(), codes, scale, bias)  # the C kernels take tensors outside autograd

    @staticmethod
    def backward(ctx, grad: Tensor):
        codes_t, scale_t, zeros = ctx.saved_tensors
        return int8_product(grad.detach(), codes_t, scale_t, zeros), None, None, None, None, None, None


class Int8FrozenLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose products run in int8 (see the module); made in place from an
    ``nn.Linear`` by :func:`int8_frozen`. Inputs that are not fp32 on the CPU, and a weight that
    needs its gradient, take ``F.linear``."""

    def _codes(self) -> tuple[Tensor, ...]:
        """(codes, scale, bias, codes of W^T, their scale, zeros): W ≈ diag(scale) codes for the
        forward, W^T ≈ diag(scale_t) codes_t for the input gradient; made when the weight changes."""
        w = self.weight
        key = (w.data_ptr(), w._version)
        if getattr(self, "_int8_key", None) != key:
            with torch.no_grad():
                wf = w.detach().float()
                codes, scale = quant_rows(wf.contiguous())
                codes_t, scale_t = quant_rows(wf.t().contiguous())
                bias = (self.bias.detach().float() if self.bias is not None else w.new_zeros(w.shape[0])).contiguous()
            self.register_buffer("int8_codes", codes, persistent=False)
            self.register_buffer("int8_codes_t", codes_t, persistent=False)
            self._int8 = (scale, bias, scale_t, w.new_zeros(w.shape[1], dtype=torch.float32))
            self._int8_key = key
        scale, bias, scale_t, zeros = self._int8
        return self.int8_codes, scale, bias, self.int8_codes_t, scale_t, zeros

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if x.dtype != torch.float32 or x.device.type != "cpu" or w.requires_grad or w.dtype != torch.float32 \
                or (self.bias is not None and self.bias.requires_grad):
            return F.linear(x, w, self.bias)
        y = _Int8Product.apply(x.reshape(-1, x.shape[-1]), *self._codes())
        return y.view(*x.shape[:-1], y.shape[-1])


def int8_frozen(model: nn.Module, keep: tuple[str, ...] = ()) -> int:
    """Make every frozen plain ``nn.Linear`` of ``model`` (fp32, CPU; an adapter layer's base
    included) an :class:`Int8FrozenLinear`. Trainable layers, an adapter's own layers (LoRA's A
    and B) and the modules under the qualified names in ``keep`` (a reloaded run's head: what
    trained in fp32 stays fp32) are left as they are. Returns the number of layers converted."""
    skip: set[int] = set()
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "lora_B"):
            skip.update(id(x) for x in m.lora_A.modules())
            skip.update(id(x) for x in m.lora_B.modules())
        if any(name == k or name.startswith(k + ".") for k in keep):
            skip.add(id(m))
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and id(m) not in skip and not m.weight.requires_grad \
                and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu" \
                and (m.bias is None or not m.bias.requires_grad):
            m.__class__ = Int8FrozenLinear
            n += 1
    return n
