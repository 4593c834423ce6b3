"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

A small residual MLP on a sublayer's output, before the block's own residual connection:

    h = base(x)                                   (..., d)
    y = h + W_up act(W_down h + b_down) + b_up    W_down: (d/rf, d), W_up: (d, d/rf), W_up = 0 at start

``houlsby`` places one after the attention output projection and one after the feed-forward
output projection of every block; ``pfeiffer`` only the feed-forward one. ``reduction_factor``
``rf`` sets the bottleneck width ``d / rf``. Adapters add a non-linearity, so they cannot be
merged into the base weights. peft has no such kind: folders use peft's layout with
``peft_type: BOTTLENECK`` (tensors ``<path>.adapter_down.weight`` ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.adapters.base import AdapterLayer, autocast_on, linear_targets, replace_module
from lmforge.adapters.registry import AdapterKind, register_adapter
from lmforge.errors import LmforgeError

ATTN_OUT = r".*\.(attention\.output\.dense|self_attn\.o_proj|attn\.c_proj|attention\.dense|self_attn\.out_proj" \
           r"|attention\.out_lin)"
FFN_OUT = r".*(?<!attention)\.output\.dense|.*\.(mlp\.down_proj|mlp\.c_proj|mlp\.dense_4h_to_h|fc2|ffn\.lin2)"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class BottleneckSpec:
    """Bottleneck adapter options.

    Attributes:
        placement: ``houlsby`` (after attention and feed-forward) or ``pfeiffer`` (feed-forward only).
        reduction_factor: bottleneck width = hidden size / reduction_factor.
        activation: relu, gelu, silu or tanh.
        target_modules: override the placement: sublayer output projections to adapt (suffix list
            or full-match regex).
        modules_to_save: modules trained in full and saved with the adapter.
    """

    placement: str = "pfeiffer"
    reduction_factor: int = 16
    activation: str = "relu"
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.placement not in ("houlsby", "pfeiffer"):
            raise LmforgeError(f"bottleneck placement must be houlsby or pfeiffer, got {self.placement!r}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) \
                or self.reduction_factor <= 0:
            raise LmforgeError(f"bottleneck reduction_factor must be a positive integer, got {self.reduction_factor!r}")
        if self.activation not in ACTIVATIONS:
            raise LmforgeError(f"bottleneck activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save or [])

    def targets(self) -> list[str] | str:
        if self.target_modules is not None:
            return self.target_modules
        return f"{ATTN_OUT}|{FFN_OUT}" if self.placement == "houlsby" else FFN_OUT


class BottleneckAdapter(AdapterLayer):
    """``h + up(act(down(h)))`` on the output ``h`` of a linear layer."""

    def __init__(self, base: nn.Module, reduction_factor: int, activation: str):
        super().__init__(base)
        d = base.out_features
        width = max(1, d // reduction_factor)
        self.adapter_down = nn.Linear(d, width, device=self.device, dtype=torch.float32)
        self.adapter_up = nn.Linear(width, d, device=self.device, dtype=torch.float32)
        self.act = ACTIVATIONS[activation]()
        nn.init.zeros_(self.adapter_up.weight)  # the adapter starts as the identity
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)  # (..., d)
        if self.disabled:
            return h
        z = h if autocast_on(h.device.type) else h.to(self.adapter_down.weight.dtype)
        delta = self.adapter_up(self.act(self.adapter_down(z)))  # (..., d)
        return h + delta.to(h.dtype)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"adapter_down.weight": self.adapter_down.weight, "adapter_down.bias": self.adapter_down.bias,
                "adapter_up.weight": self.adapter_up.weight, "adapter_up.bias": self.adapter_up.bias}


class BottleneckKind(AdapterKind):
    name = "bottleneck"
    label = "bottleneck"
    spec_cls = BottleneckSpec
    peft_type = "BOTTLENECK"
    excluded_tasks = {"embed": "embed saves merged weights", "mlm": "mlm saves merged weights"}

    def default_targets(self, model, task_defaults):
        return None  # placement decides

    def apply(self, model, spec, skip, tokenizer=None) -> list[str]:
        targets = linear_targets(model, spec.targets(), skip, self.label)
        modules = dict(model.named_modules())
        for name in targets:
            replace_module(model, name, BottleneckAdapter(modules[name], spec.reduction_factor, spec.activation))
        return targets

    def peft_config(self, spec, model) -> dict:
        names = [n for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]
        return {"placement": spec.placement, "reduction_factor": spec.reduction_factor,
                "activation": spec.activation, "target_modules": names}

    def spec_from_peft(self, config, model, tensor_names, where):
        try:
            return BottleneckSpec(placement=config.get("placement", "pfeiffer"),
                                  reduction_factor=int(config.get("reduction_factor", 16)),
                                  activation=config.get("activation", "relu"),
                                  target_modules=config.get("target_modules"),
                                  modules_to_save=list(config.get("modules_to_save") or []))
        except (TypeError, ValueError) as err:
            raise LmforgeError(f"{where}: bad value ({err})") from None


register_adapter(BottleneckKind())
