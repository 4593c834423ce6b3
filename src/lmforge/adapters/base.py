"""The adapter protocol: layers that wrap a module in place, and what every kind shares.

An adapter kind (LoRA, DoRA, IA3, prompt tuning, bottleneck) is one module defining

- its layer(s): subclasses of :class:`AdapterLayer` (``disabled`` switch, ``merge``/``unmerge``
  where the kind allows, ``adapter_tensors()`` under peft's names),
- a spec dataclass (its options), and
- an :class:`~lmforge.adapters.registry.AdapterKind` registered with
  :func:`~lmforge.adapters.registry.register_adapter` (how to apply it, its peft config).

Everything else (disable as a context, merge/unmerge/unwrap, the state dict, trainable
parameters, PEFT-folder I/O) works on any kind through this protocol.
"""
from __future__ import annotations

import copy
import re
from contextlib import contextmanager

import torch
from torch import nn

from lmforge.errors import LmforgeError

PEFT_PREFIX = "base_model.model."


class AdapterLayer(nn.Module):
    """A module wrapped in place: ``base`` is the original; attribute reads fall through to it.

    Subclasses implement ``forward`` (returning ``base``'s output when ``disabled``) and
    ``adapter_tensors()``; mergeable kinds also ``_shift(sign)`` and set ``mergeable = True``.
    """

    mergeable = False

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.disabled = False
        self.merged = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self._modules["base"], name)  # e.g. .weight, .bias for HF code

    @property
    def device(self) -> torch.device | None:
        tensors = list(self.base.parameters()) + list(self.base.buffers())
        return tensors[0].device if tensors else None

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by their peft suffix (``lora_A.weight`` ...)."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        """The base's floating-point weight (out, in); a 4-bit base must be dequantised first."""
        weight = getattr(self.base, "weight", None)
        if (callable(getattr(self.base, "dequantize", None)) or not isinstance(weight, torch.Tensor)
                or not weight.is_floating_point()):
            raise LmforgeError("cannot merge into a 4-bit base; dequantise the model first")
        return weight

    def merge(self) -> None:
        """Fold the adapter into the base weights (no-op when already merged)."""
        if not self.mergeable:
            raise LmforgeError(f"{type(self).__name__} adapters cannot be merged into the base weights")
        if not self.merged:
            self._shift(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Take the adapter out of the base weights again (no-op when not merged)."""
        if self.merged:
            self._shift(-1.0)
            self.merged = False

    def _shift(self, sign: float) -> None:
        raise NotImplementedError


class ModelAdapter(nn.Module):
    """An adapter that belongs to the whole model rather than to one layer (prompt tuning).

    It is attached as a submodule of the model; ``adapter_tensors()`` returns full saved names;
    ``remove()`` takes it (and any hooks) out again. It cannot be merged.
    """

    mergeable = False
    merged = False

    def __init__(self):
        super().__init__()
        self.disabled = False

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def merge(self) -> None:
        raise LmforgeError(f"{type(self).__name__} adapters cannot be merged into the base weights")

    def unmerge(self) -> None:
        pass


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


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a module with in/out_features and ``dequantize()`` (4-bit base)."""
    if isinstance(module, nn.Linear):
        return True
    return (hasattr(module, "in_features") and hasattr(module, "out_features")
            and callable(getattr(module, "dequantize", None)))


def autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def suffix_match(name: str, entries) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries)


def is_target(name: str, target_modules: list[str] | str) -> bool:
    """Suffix match for a list (peft's rule), full match for a regex string."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return suffix_match(name, target_modules)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def adapter_modules(model: nn.Module, kind=(AdapterLayer, ModelAdapter, ModulesToSave)) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every adapter layer, model-level adapter and modules_to_save copy."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]


def has_adapter(model: nn.Module) -> bool:
    return getattr(model, "_lmforge_adapter", None) is not None or bool(adapter_modules(model))


def linear_targets(model: nn.Module, target_modules, skip: list[str], what: str) -> list[str]:
    """Names of the linear-like modules matching ``target_modules`` (not inside ``skip``)."""
    modules = dict(model.named_modules())
    targets = [n for n, m in modules.items()
               if n and is_linear_like(m) and is_target(n, target_modules)
               and not any(n == s or n.startswith(s + ".") for s in skip)]
    if not targets:
        linear = [n for n, m in modules.items() if n and is_linear_like(m)]
        examples = ", ".join(linear[:5]) or "none"
        raise LmforgeError(f"{what} target_modules {target_modules!r} matched no linear module; "
                           f"linear modules include: {examples}")
    return targets


def saved_modules(model: nn.Module, modules_to_save: list[str]) -> list[str]:
    """Names of the modules to train in full (outermost matches of the suffixes)."""
    names = [n for n, _ in model.named_modules() if n]
    missing = [e for e in modules_to_save if not any(suffix_match(n, [e]) for n in names)]
    if missing:
        raise LmforgeError(f"modules_to_save entry {missing[0]!r} matches no module of the model")
    saved: list[str] = []
    for name in names:
        if suffix_match(name, modules_to_save) and not any(name.startswith(s + ".") for s in saved):
            saved.append(name)
    return saved


def wrap_saved(model: nn.Module, saved: list[str]) -> None:
    modules = dict(model.named_modules())
    for name in saved:
        replace_module(model, name, ModulesToSave(modules[name]))


def merge_adapters(model: nn.Module) -> None:
    """Fold every mergeable adapter layer into its base weight (idempotent); a kind that cannot
    be merged raises :class:`LmforgeError`."""
    for _, m in adapter_modules(model, (AdapterLayer, ModelAdapter)):
        m.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_adapters` (idempotent)."""
    for _, m in adapter_modules(model, AdapterLayer):
        m.unmerge()


@contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model: adapters and modules_to_save off (merged updates are taken out).

    The previous state (disabled flags and merges) is restored on exit, also on exceptions.
    """
    wrappers = [m for _, m in adapter_modules(model)]
    state = [(m, m.disabled, getattr(m, "merged", False)) for m in wrappers]
    try:
        for m in wrappers:
            if isinstance(m, (AdapterLayer, ModelAdapter)):
                m.unmerge()
            m.disabled = True
        yield model
    finally:
        for m, disabled, merged in state:
            m.disabled = disabled
            if merged:
                m.merge()


def unwrap_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter and put each base back (modules_to_save: the trained copy).

    Raises:
        LmforgeError: the adapter kind cannot be merged (prompt tuning, bottleneck).
    """
    layers = adapter_modules(model)
    for _, m in layers:
        if isinstance(m, (AdapterLayer, ModelAdapter)) and not m.mergeable:
            raise LmforgeError(f"{type(m).__name__} adapters cannot be merged into the base weights; "
                               "keep the adapter folder and load it with the base model")
    for name, m in layers:
        if isinstance(m, AdapterLayer):
            m.merge()
            replace_module(model, name, m.base)
        else:
            replace_module(model, name, m.trained)
    for key in ("_lmforge_adapter", "_lmforge_lora"):
        model.__dict__.pop(key, None)
    return model


def remove_adapters(model: nn.Module, grads: dict[int, bool] | None = None) -> None:
    """Take unmerged adapters out again (the model as it was before ``apply``)."""
    for name, m in adapter_modules(model):
        if isinstance(m, ModelAdapter):
            m.remove()
        else:
            replace_module(model, name, m.base if isinstance(m, AdapterLayer) else m.original)
    for key in ("_lmforge_adapter", "_lmforge_lora", "_lmforge_adapter_kind"):
        model.__dict__.pop(key, None)
    if grads is not None:
        for p in model.parameters():
            p.requires_grad_(grads.get(id(p), p.requires_grad))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names (detached views of the live tensors).

    Layers: ``base_model.model.<path>.<suffix>``; modules_to_save: ``base_model.model.<path>.<tensor>``
    (the trained copy); model-level adapters (prompt tuning) under their own names, and with them
    peft's prefix for the rest is ``base_model.``.
    """
    layers = adapter_modules(model)
    prefix = "base_model." if any(isinstance(m, ModelAdapter) for _, m in layers) else PEFT_PREFIX
    out: dict[str, torch.Tensor] = {}
    for name, m in layers:
        if isinstance(m, AdapterLayer):
            for suffix, t in m.adapter_tensors().items():
                out[f"{prefix}{name}.{suffix}"] = t.detach()
        elif isinstance(m, ModelAdapter):
            out.update({k: t.detach() for k, t in m.adapter_tensors().items()})
        else:
            for key, t in m.trained.state_dict(keep_vars=True).items():
                out[f"{prefix}{name}.{key}"] = t.detach()
    return out


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
