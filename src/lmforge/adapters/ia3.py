"""(IA)^3: learned rescaling of keys, values and feed-forward activations (Liu et al. 2022, eq. (1)).

    attention targets (k, v):   y = l ⊙ (W x + b)          l: (out,), initialised to 1
    feed-forward targets:       y = W (l ⊙ x) + b          l: (in,),  initialised to 1

Both fold into the weights (``W <- diag(l) W, b <- l ⊙ b`` or ``W <- W diag(l)``), so the adapter
is mergeable. Saved as peft's ``IA3`` (``<path>.ia3_l`` of shape (out, 1) or (1, in)).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field  # noqa: F401

import torch
from torch import nn

from lmforge.adapters.base import AdapterLayer, is_target, linear_targets, replace_module
from lmforge.adapters.registry import AdapterKind, register_adapter
from lmforge.errors import LmforgeError

# Attention keys/values and feed-forward output projections (the FFN's input is rescaled).
ATTENTION = ["key", "value", "k_proj", "v_proj", "k_lin", "v_lin"]
FEEDFORWARD = r".*(?<!attention)\.output\.dense|.*\.(down_proj|fc2|mlp\.c_proj|dense_4h_to_h|ffn\.lin2)"


@dataclass
class Ia3Spec:
    """(IA)^3 options.

    Attributes:
        target_modules: modules to rescale (suffix list or full-match regex); None: attention keys
            and values plus the feed-forward modules.
        feedforward_modules: the targets whose *input* is rescaled (suffix list or regex).
        modules_to_save: modules trained in full and saved with the adapter.
    """

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str = FEEDFORWARD
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self):
        for key in ("target_modules", "feedforward_modules"):
            value = getattr(self, key)
            if value is None:
                continue
            if not isinstance(value, str):
                setattr(self, key, list(value))
                continue
            try:
                re.compile(value)
            except re.error as err:
                raise LmforgeError(f"IA3 {key}: bad regex ({err})") from None
        self.modules_to_save = list(self.modules_to_save or [])


class Ia3Linear(AdapterLayer):
    """``l ⊙ base(x)`` (attention) or ``base(l ⊙ x)`` (feed-forward) around a linear layer."""

    mergeable = True

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__(base)
        self.feedforward = feedforward
        shape = (1, base.in_features) if feedforward else (base.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=self.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base(x)
        l = self.ia3_l.view(-1)
        if self.feedforward:
            return self.base((x * l).to(x.dtype))  # (..., in) rescaled
        y = self.base(x)  # (..., out)
        return (y * l).to(y.dtype)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l}

    @torch.no_grad()
    def _shift(self, sign: float) -> None:
        weight = self.base_weight()  # (out, in)
        l = self.ia3_l.float()  # (out, 1) or (1, in): broadcasts against (out, in)
        factor = l if sign > 0 else 1.0 / l
        weight.copy_((weight.float() * factor).to(weight.dtype))
        bias = getattr(self.base, "bias", None)
        if not self.feedforward and bias is not None:
            bias.copy_((bias.float() * factor.view(-1)).to(bias.dtype))


class Ia3Kind(AdapterKind):
    name = "ia3"
    label = "IA3"
    spec_cls = Ia3Spec
    peft_type = "IA3"
    required = ("target_modules",)
    mergeable = True

    def default_targets(self, model, task_defaults):
        return None  # the spec's own defaults (keys, values, feed-forward outputs)

    def apply(self, model, spec, skip, tokenizer=None) -> list[str]:
        ff = spec.feedforward_modules or []
        target = spec.target_modules
        if target is None:  # default: keys/values + feed-forward outputs
            names = [n for n, _ in model.named_modules() if n and (is_target(n, ATTENTION) or is_target(n, ff))]
            target = names or ATTENTION
        targets = linear_targets(model, target, skip, self.label)
        modules = dict(model.named_modules())
        for name in targets:
            replace_module(model, name, Ia3Linear(modules[name], feedforward=is_target(name, ff)))
        return targets

    def peft_config(self, spec, model) -> dict:
        """Targets as the full names wrapped (unambiguous for peft's suffix matching)."""
        names = [n for n, m in model.named_modules() if isinstance(m, Ia3Linear)]
        ff = [n for n, m in model.named_modules() if isinstance(m, Ia3Linear) and m.feedforward]
        return {"target_modules": names, "feedforward_modules": ff, "fan_in_fan_out": False,
                "init_ia3_weights": True}

    def spec_from_peft(self, config, model, tensor_names, where):
        if config.get("fan_in_fan_out"):
            raise LmforgeError(f"{where}: fan_in_fan_out=True is not supported")
        target, ff = config.get("target_modules"), config.get("feedforward_modules")
        if target is None:
            raise LmforgeError(f"{where}: missing key 'target_modules'")
        ff = ff if ff is not None else []
        return Ia3Spec(target_modules=target if isinstance(target, str) else list(target),
                       feedforward_modules=ff if isinstance(ff, str) else list(ff),
                       modules_to_save=list(config.get("modules_to_save") or []))


register_adapter(Ia3Kind())
