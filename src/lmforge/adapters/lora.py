"""LoRA: low-rank adapters wrapped around linear layers in place.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. (3):

    y = W0 x + (alpha / r) * B A x,        A: (r, in), B: (out, r), B initialised to 0

rsLoRA (Kalajdzievski 2023) replaces the scale alpha / r with alpha / sqrt(r).
State-dict names follow peft (``<path>.lora_A.weight``), so adapters round-trip with it.
"""
from __future__ import annotations

import copy
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.errors import LmforgeError

PEFT_PREFIX = "base_model.model."


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
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LmforgeError(f"LoRA r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise LmforgeError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise LmforgeError("LoRA target_modules is empty")
        self.modules_to_save = list(self.modules_to_save or [])

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` when ``use_rslora``."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a module with in/out_features and ``dequantize()`` (4-bit base)."""
    if isinstance(module, nn.Linear):
        return True
    return (hasattr(module, "in_features") and hasattr(module, "out_features")
            and callable(getattr(module, "dequantize", None)))


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


class LoraLinear(nn.Module):
    """``y = base(x) + lora_B(lora_A(dropout(x))) * scale`` around a linear-like ``base``.

    LoRA weights are kept in float32 (master weights) on the base's device; inputs are cast
    to their dtype outside autocast and the update is cast back to the base output's dtype.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 *, use_rslora: bool = False):
        super().__init__()
        spec = LoraSpec(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        tensors = list(base.parameters()) + list(base.buffers())
        device = tensors[0].device if tensors else None
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # same init as peft
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the wrapped model starts equal to the base
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.scale = spec.scale
        self.disabled = False
        self.merged = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self._modules["base"], name)  # e.g. .weight, .bias for HF code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.disabled or self.merged:
            return y
        w = self.lora_A.weight
        if x.dtype != w.dtype and not _autocast_on(x.device.type):
            x = x.to(w.dtype)
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        a = self.lora_A(x)  # (..., in) -> (..., r)
        if a.dtype == y.dtype:  # one GEMM: y + scale * a @ B.T, no (..., out) temporaries
            out = torch.addmm(y.reshape(-1, y.shape[-1]), a.reshape(-1, a.shape[-1]), self.lora_B.weight.T,
                              alpha=self.scale)  # (N, out)
            return out.view(y.shape)
        delta = self.lora_B(a)  # (..., out)
        return y + (delta * self.scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A``: (out, in) in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    def _base_weight(self) -> torch.Tensor:
        weight = getattr(self.base, "weight", None)
        if (callable(getattr(self.base, "dequantize", None)) or not isinstance(weight, torch.Tensor)
                or not weight.is_floating_point()):
            raise LmforgeError("cannot merge into a 4-bit base; dequantise the model first")
        return weight

    def merge(self) -> None:
        """Fold the update into ``base.weight`` (no-op when already merged)."""
        if not self.merged:
            self._shift(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Subtract the update from ``base.weight`` (no-op when not merged)."""
        if self.merged:
            self._shift(-1.0)
            self.merged = False

    @torch.no_grad()
    def _shift(self, sign: float) -> None:
        weight = self._base_weight()  # (out, in)
        weight.copy_((weight.float() + sign * self.delta_weight()).to(weight.dtype))


class ModulesToSave(nn.Module):
    """A fully trained copy of a module (peft's modules_to_save): ``original`` stays frozen."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original = module
        self.trained = copy.deepcopy(module)
        self.original.requires_grad_(False)
        self.trained.requires_grad_(True)
        self.disabled = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original", "trained"):
                raise
            return getattr(self._modules["original" if self.disabled else "trained"], name)

    def forward(self, *args, **kwargs):
        return (self.original if self.disabled else self.trained)(*args, **kwargs)


def _suffix_match(name: str, entries) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries)


def _is_target(name: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return _suffix_match(name, target_modules)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _wrappers(model: nn.Module, kind=(LoraLinear, ModulesToSave)):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Freeze ``model``, wrap the target linear layers in :class:`LoraLinear` in place.

    Returns:
        The names of the modules wrapped with LoRA.
    """
    if getattr(model, "_lmforge_lora", None) is not None or _wrappers(model):
        raise LmforgeError("the model already has LoRA adapters; unwrap it before applying new ones")
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    saved: list[str] = []
    for name in modules:
        if name and _suffix_match(name, spec.modules_to_save) and not any(
                name.startswith(s + ".") for s in saved):
            saved.append(name)
    missing = [e for e in spec.modules_to_save if not any(_suffix_match(n, [e]) for n in modules if n)]
    if missing:
        raise LmforgeError(f"modules_to_save entry {missing[0]!r} matches no module of the model")
    targets = [n for n, m in modules.items()
               if n and is_linear_like(m) and _is_target(n, spec.target_modules)
               and not any(n == s or n.startswith(s + ".") for s in saved)]
    if not targets:
        linear = [n for n, m in modules.items() if n and is_linear_like(m)]
        examples = ", ".join(linear[:5]) or "none"
        raise LmforgeError(f"LoRA target_modules {spec.target_modules!r} matched no linear module; "
                           f"linear modules include: {examples}")
    for name in targets:
        _replace(model, name, LoraLinear(modules[name], spec.r, spec.alpha, spec.dropout,
                                         use_rslora=spec.use_rslora))
    for name in saved:
        _replace(model, name, ModulesToSave(modules[name]))
    model._lmforge_lora = spec
    return targets


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (idempotent)."""
    for _, m in _wrappers(model, LoraLinear):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora` (idempotent)."""
    for _, m in _wrappers(model, LoraLinear):
        m.unmerge()


@contextmanager
def disable_lora(model: nn.Module):
    """Run the base model: LoRA and modules_to_save off (merged updates are taken out).

    The previous state (disabled flags and merges) is restored on exit, also on exceptions.
    """
    wrappers = [m for _, m in _wrappers(model)]
    state = [(m, m.disabled, getattr(m, "merged", False)) for m in wrappers]
    try:
        for m in wrappers:
            if isinstance(m, LoraLinear):
                m.unmerge()
            m.disabled = True
        yield model
    finally:
        for m, disabled, merged in state:
            m.disabled = disabled
            if merged:
                m.merge()


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Merge LoRA and replace every wrapper by its base (modules_to_save by the trained copy)."""
    for name, m in _wrappers(model):
        if isinstance(m, LoraLinear):
            m.merge()
            _replace(model, name, m.base)
        else:
            _replace(model, name, m.trained)
    if "_lmforge_lora" in model.__dict__:
        del model._lmforge_lora
    return model


def trainable_parameters(model: nn.Module) -> dict:
    """Count trainable and all parameters, each shared (tied) tensor once.

    Returns:
        ``dict(trainable=int, total=int, percent=float)`` with percent = 100 * trainable / total.
    """
    seen: set = set()
    trainable = total = 0
    for p in model.parameters():
        key = (p.data_ptr(), p.numel()) if p.device.type != "meta" else id(p)
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return dict(trainable=trainable, total=total, percent=100.0 * trainable / total if total else 0.0)


def format_trainable(d: dict) -> str:
    """``"trainable params: 1,090 || all params: 39,012 || trainable%: 2.7940"``."""
    return (f"trainable params: {d['trainable']:,} || all params: {d['total']:,} || "
            f"trainable%: {d['percent']:.4f}")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names.

    LoRA: ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``; modules_to_save:
    ``base_model.model.<path>.<tensor>`` (the trained copy). Values are detached views of the
    live tensors (they share storage with the model).
    """
    out: dict[str, torch.Tensor] = {}
    for name, m in _wrappers(model):
        if isinstance(m, LoraLinear):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
        else:
            for key, t in m.trained.state_dict(keep_vars=True).items():
                out[f"{PEFT_PREFIX}{name}.{key}"] = t.detach()
    return out
