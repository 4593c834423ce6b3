"""The adapter registry: one :class:`AdapterKind` per kind, registered in one call.

Like peft's ``register_peft_method(name=..., config_cls=..., model_cls=...)``, a kind module ends
with ``register_adapter(MyKind())``; ``lmforge.adapters`` imports the kind modules, so the kind is
then known to the config (``adapter: {kind: ...}``), the tasks, PEFT-folder I/O and ``compare``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from lmforge.adapters.base import adapter_modules, has_adapter, saved_modules, wrap_saved
from lmforge.errors import LmforgeError

KINDS: dict[str, "AdapterKind"] = {}

# Tasks that train adapters (adapter section accepted).
ADAPTER_TASKS = ("classify", "ner", "mlm", "sft", "preference", "reward", "embed")


class AdapterKind:
    """What a kind tells the rest of lmforge. Subclasses set the attributes and implement
    :meth:`apply`, :meth:`peft_config` and :meth:`spec_from_peft`.

    Attributes:
        name: the ``adapter.kind`` value; label: its name in messages (``LoRA``).
        spec_cls: the options dataclass (its fields are the kind's options).
        peft_type: ``peft_type`` in ``adapter_config.json`` (peft's, or our own for kinds peft lacks).
        mergeable: the adapter can be folded into the base weights.
        excluded_tasks: task -> why this kind cannot be used there.
        required: keys its ``adapter_config.json`` must have.
    """

    name = ""
    label = ""
    spec_cls: type = object
    peft_type = ""
    mergeable = False
    excluded_tasks: dict[str, str] = {}
    required: tuple[str, ...] = ()

    # ---- options --------------------------------------------------------------------------
    def options(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.spec_cls)]

    def make_spec(self, options: dict[str, Any], *, default_targets: list[str] | None = None,
                  modules_to_save: list[str] | None = None, model: nn.Module | None = None):
        """The spec from config options; unset targets/modules_to_save take the task's defaults."""
        opts = {k: v for k, v in options.items() if v is not None}
        if "target_modules" in self.options() and "target_modules" not in opts:
            defaults = self.default_targets(model, default_targets)
            if defaults is not None:
                opts["target_modules"] = defaults
        if "modules_to_save" not in opts and modules_to_save is not None:
            opts["modules_to_save"] = list(modules_to_save)
        return self.spec_cls(**opts)

    def default_targets(self, model: nn.Module | None, task_defaults: list[str] | None):
        """Targets when the user sets none: the task's defaults present in the model."""
        if not task_defaults:
            return None
        if model is None:
            return list(task_defaults)
        have = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        chosen = [t for t in task_defaults if t in have]
        if not chosen:
            raise LmforgeError(f"no default {self.name} targets ({', '.join(task_defaults)}) in this model; "
                               "set adapter.target_modules")
        return chosen

    # ---- model surgery ----------------------------------------------------------------------
    def apply(self, model: nn.Module, spec, skip: list[str], tokenizer=None) -> list[str]:
        """Wrap ``model`` in place (frozen already); return the adapted module names."""
        raise NotImplementedError

    # ---- peft folder format -------------------------------------------------------------------
    def claims(self, config: dict) -> bool:
        """Whether an ``adapter_config.json`` describes this kind."""
        return config.get("peft_type") == self.peft_type

    def peft_config(self, spec, model: nn.Module) -> dict:
        raise NotImplementedError

    def spec_from_peft(self, config: dict, model: nn.Module, tensor_names: set[str], where: str):
        raise NotImplementedError


def register_adapter(kind: AdapterKind) -> AdapterKind:
    """Make ``kind`` known everywhere (config, tasks, I/O, compare). Returns it."""
    if not kind.name or kind.name in KINDS:
        raise ValueError(f"adapter kind {kind.name!r} is empty or registered twice")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> AdapterKind:
    import lmforge.adapters  # noqa: F401  (registers the built-in kinds)

    kind = KINDS.get(name)
    if kind is None:
        raise LmforgeError(f"adapter.kind: unknown adapter kind {name!r} (choose from {', '.join(KINDS)})")
    return kind


def kind_of_spec(spec) -> AdapterKind:
    import lmforge.adapters  # noqa: F401

    for kind in KINDS.values():
        if type(spec) is kind.spec_cls:
            return kind
    raise LmforgeError(f"{type(spec).__name__} is not the spec of a registered adapter kind")


def kind_of_config(config: dict, where: str) -> AdapterKind:
    """The kind an ``adapter_config.json`` describes."""
    import lmforge.adapters  # noqa: F401

    for kind in KINDS.values():
        if kind.claims(config):
            for key in kind.required:
                if config.get(key) is None:
                    raise LmforgeError(f"{where}: missing key {key!r}")
            return kind
    known = sorted({k.peft_type for k in KINDS.values()})
    raise LmforgeError(f"{where}: peft_type {config.get('peft_type')!r} is not supported "
                       f"(supported: {', '.join(known)})")


def check_task(kind: str, task: str) -> None:
    """Refuse a kind the task cannot use, naming the tasks that can."""
    k = get_kind(kind)
    if task in k.excluded_tasks:
        can = [t for t in ADAPTER_TASKS if t not in k.excluded_tasks]
        raise LmforgeError(f"adapter.kind: {kind} cannot be used by task {task} ({k.excluded_tasks[task]}, "
                           f"{kind} adapters cannot be merged); "
                           f"tasks that can: {', '.join(can)}")


def validate_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check ``adapter:`` options against the kind: another kind's option, an unknown key and a
    wrong type are one-line errors naming the key. Returns the options, typed."""
    from pydantic import ConfigDict, TypeAdapter, ValidationError

    k = get_kind(kind)
    own = set(k.options())
    for key in options:
        if key not in own:
            others = [n for n, o in KINDS.items() if key in o.options()]
            if others:
                raise LmforgeError(f"adapter.{key}: an option of {' and '.join(others)}, not of {kind} "
                                   f"({kind} takes: {', '.join(sorted(own))})")
            raise LmforgeError(f"adapter.{key}: unknown option ({kind} takes: {', '.join(sorted(own))})")
    fields = {f.name: f for f in dataclasses.fields(k.spec_cls)}
    typed: dict[str, Any] = {}
    for key, value in options.items():
        if value is None:
            typed[key] = None
            continue
        try:
            typed[key] = TypeAdapter(_annotation(k.spec_cls, fields[key]),
                                     config=ConfigDict(allow_inf_nan=False)).validate_python(value)
        except ValidationError as err:
            e = err.errors()[0]
            raise LmforgeError(f"adapter.{key}: {e['msg']} (got {value!r})") from None
    try:
        k.spec_cls(**{kk: v for kk, v in typed.items() if v is not None})  # value checks (ranges)
    except TypeError as err:
        raise LmforgeError(f"adapter: {err}") from None
    return typed


def _annotation(cls: type, field: dataclasses.Field):
    import typing

    return typing.get_type_hints(cls)[field.name]


def apply_adapter(model: nn.Module, spec, *, tokenizer=None) -> list[str]:
    """Freeze ``model`` and add the adapter ``spec`` describes, in place.

    Returns:
        The names of the adapted modules.
    """
    kind = kind_of_spec(spec)
    if has_adapter(model):
        raise LmforgeError("the model already has adapters; unwrap it before applying new ones")
    model.requires_grad_(False)
    saved = saved_modules(model, list(getattr(spec, "modules_to_save", None) or []))
    names = kind.apply(model, spec, saved, tokenizer)
    wrap_saved(model, saved)
    model._lmforge_adapter = spec
    model._lmforge_adapter_kind = kind.name
    return names


def adapter_kind(model: nn.Module) -> str | None:
    """The kind of the adapter applied to ``model`` (None: no adapter)."""
    return getattr(model, "_lmforge_adapter_kind", None) or ("lora" if adapter_modules(model) else None)
