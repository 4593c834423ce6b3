"""LoRA: low-rank adapters wrapped around linear layers in place.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. (3):

    y = W0 x + (alpha / r) * B A x,        A: (r, in), B: (out, r), B initialised to 0

rsLoRA (Kalajdzievski 2023) replaces the scale alpha / r with alpha / sqrt(r).
State-dict names follow peft (``<path>.lora_A.weight``), so adapters round-trip with it.
The generic adapter functions (disable, merge, unwrap, state dict) live in
:mod:`lmforge.adapters.base`; the ``*_lora`` names are kept as aliases.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.adapters.base import (PEFT_PREFIX, AdapterLayer, ModulesToSave, adapter_modules,  # noqa: F401
                                   adapter_state_dict, autocast_on, disable_adapters, format_trainable,
                                   is_linear_like, linear_targets, merge_adapters, replace_module,
                                   suffix_match, trainable_parameters, unmerge_adapters, unwrap_adapters)
from lmforge import packed_train
from lmforge.adapters.registry import AdapterKind, apply_adapter, register_adapter
from lmforge.errors import LmforgeError

# Config fields meaning a LoRA variant not implemented here, with their neutral value.
UNSUPPORTED = {"fan_in_fan_out": False, "bias": "none", "lora_bias": False,
               "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
               "exclude_modules": None, "target_parameters": None,
               "trainable_token_indices": None, "layer_replication": None, "use_qalora": False}


@dataclass
class LoraSpec:
    """What to adapt and how.

    Attributes:
        r: rank of the update ``B @ A``.
        alpha: numerator of the scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout probability on the LoRA input (0 selects the fast path).
        target_modules: module-name suffixes (list) or a regex that must fullmatch (str).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a head).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "key", "value"])
    use_rslora: bool = False
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self):
        name = type(self).__name__.replace("Spec", "")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LmforgeError(f"{name} r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise LmforgeError(f"{name} dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise LmforgeError(f"{name} target_modules is empty")
        self.modules_to_save = list(self.modules_to_save or [])

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` when ``use_rslora``."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(AdapterLayer):
    """``y = base(x) + lora_B(lora_A(dropout(x))) * scale`` around a linear-like ``base``.

    LoRA weights are kept in float32 (master weights) on the base's device; inputs are cast
    to their dtype outside autocast and the update is cast back to the base output's dtype.
    """

    mergeable = True

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 *, use_rslora: bool = False):
        super().__init__(base)
        spec = LoraSpec(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        device = self.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # same init as peft
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the wrapped model starts equal to the base
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.scale = spec.scale

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        w = self.lora_A.weight
        if x.dtype != w.dtype and not autocast_on(x.device.type):
            x = x.to(w.dtype)
        return self.lora_dropout(x) if self.lora_dropout is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a frozen bf16 base on the CPU in training: oneDNN-prepacked GEMMs (lmforge.packed_train)
        y = packed_train.frozen_linear(self.base, x) if packed_train.applies(self.base, x) else self.base(x)
        if self.disabled or self.merged:
            return y
        a = self.lora_A(self._lora_input(x))  # (..., in) -> (..., r)
        if a.dtype == y.dtype:  # one GEMM: y + scale * a @ B.T, no (..., out) temporaries
            out = torch.addmm(y.reshape(-1, y.shape[-1]), a.reshape(-1, a.shape[-1]), self.lora_B.weight.T,
                              alpha=self.scale)  # (N, out)
            return out.view(y.shape)
        delta = self.lora_B(a)  # (..., out)
        return y + (delta * self.scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A``: (out, in) in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}

    _base_weight = AdapterLayer.base_weight

    @torch.no_grad()
    def _shift(self, sign: float) -> None:
        weight = self.base_weight()  # (out, in)
        weight.copy_((weight.float() + sign * self.delta_weight()).to(weight.dtype))


class LoraKind(AdapterKind):
    """LoRA (and, through :class:`~lmforge.adapters.dora.DoraKind`, its DoRA subclass)."""

    name = "lora"
    label = "LoRA"
    spec_cls = LoraSpec
    peft_type = "LORA"
    required = ("r", "target_modules")
    mergeable = True
    layer_cls = LoraLinear
    use_dora = False

    def apply(self, model, spec, skip, tokenizer=None) -> list[str]:
        targets = linear_targets(model, spec.target_modules, skip, self.label)
        modules = dict(model.named_modules())
        for name in targets:
            replace_module(model, name, self.layer_cls(modules[name], spec.r, spec.alpha, spec.dropout,
                                                       use_rslora=spec.use_rslora))
        packed_train.enable(model)  # Llama attention in training: per packed sequence (no-op elsewhere)
        return targets

    def claims(self, config: dict) -> bool:
        return config.get("peft_type", "LORA") == "LORA" and bool(config.get("use_dora")) == self.use_dora

    def peft_config(self, spec, model) -> dict:
        """The fields peft's ``LoraConfig`` reads (only ones known to peft >= 0.10)."""
        target = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
        return {"r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": target,
                "use_rslora": spec.use_rslora, "bias": "none", "fan_in_fan_out": False,
                "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
                "rank_pattern": {}, "alpha_pattern": {}, "use_dora": self.use_dora}

    def spec_from_peft(self, config, model, tensor_names, where):
        for key, neutral in UNSUPPORTED.items():
            value = config.get(key, neutral)
            if value not in (neutral, None) and not (neutral is None and value in ([], {})):
                raise LmforgeError(f"{where}: {key}={value!r} is not supported")
        for key in ("r", "target_modules"):
            if config.get(key) is None:
                raise LmforgeError(f"{where}: missing key {key!r}")
        target = config["target_modules"]
        try:
            return self.spec_cls(r=int(config["r"]), alpha=float(config.get("lora_alpha", 8)),
                                 dropout=float(config.get("lora_dropout") or 0.0),
                                 target_modules=target if isinstance(target, str) else list(target),
                                 use_rslora=bool(config.get("use_rslora", False)),
                                 modules_to_save=list(config.get("modules_to_save") or []))
        except (TypeError, ValueError) as err:
            raise LmforgeError(f"{where}: bad value ({err})") from None


register_adapter(LoraKind())


# ---- the LoRA-named API, kept for existing callers ----------------------------------------------
def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Freeze ``model``, wrap the target linear layers in :class:`LoraLinear` in place.

    Returns:
        The names of the modules wrapped with LoRA.
    """
    if adapter_modules(model):
        raise LmforgeError("the model already has LoRA adapters; unwrap it before applying new ones")
    return apply_adapter(model, spec)


merge_lora = merge_adapters
unmerge_lora = unmerge_adapters
disable_lora = disable_adapters
unwrap_lora = unwrap_adapters
lora_state_dict = adapter_state_dict
_replace = replace_module
_suffix_match = suffix_match
_autocast_on = autocast_on


def _wrappers(model: nn.Module, kind=(AdapterLayer, ModulesToSave)):
    return adapter_modules(model, kind)
