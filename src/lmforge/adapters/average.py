"""Weight averaging of LoRA adapters trained from one base: one adapter whose update is the average.

Averaging the weights of models fine-tuned from the same start ("model soups", Wortsman et al.
2022) gives one model that is usually more robust under distribution shift than each member;
for reward models this is WARM (Rame et al. 2024, "Weight averaged reward models"), proposed
for reward models that must hold on data unlike their training pairs.

For adapters ``i = 1..n`` with weights ``w_i`` (``sum w_i = 1``) each adapted layer's update is

    dW = sum_i w_i s B_i A_i,        s = alpha / r   (alpha / sqrt(r) with rsLoRA),

which is itself one LoRA update of rank ``n r``, exactly (no truncation)::

    B = [w_1 B_1, ..., w_n B_n]      (d_out, n r)
    A = [A_1; ...; A_n]              (n r, d_in)
    alpha' so that s' = s:           alpha' = n alpha   (rsLoRA: sqrt(n) alpha)

Every other saved tensor (task heads kept through ``modules_to_save``, biases) is averaged
element-wise, ``sum_i w_i theta_i``. The members must be LoRA adapters (not DoRA, whose
normalised update is not linear in ``B A``) with the same rank, alpha, targets, saved modules
and tensor names and shapes; the first difference is named.

Members may also be checkpoints of ONE run along its trajectory (``step-N``: the trainable tensors
a step saved), averaged the same way: trajectory averaging (SWA, Izmailov et al. 2018; SWAD for
domain generalisation, Cha et al. 2021; LAWA, Kaddour 2022). :func:`checkpoint_as_adapter` names a
step's tensors as the run's final adapter names them and refuses anything that does not match.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ..errors import LmforgeError

# adapter_config.json keys every member must share (the weights differ, nothing else may).
SHARED_KEYS = ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules",
               "modules_to_save", "bias", "fan_in_fan_out", "layers_to_transform", "layers_pattern")


def member_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """The members' weights normalised to sum 1 (equal when None); one-line errors."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise LmforgeError(f"average: {len(w)} weights for {n} adapters")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise LmforgeError(f"average: weights must be >= 0 with a positive sum, got {w}")
    total = sum(w)
    return [x / total for x in w]


def _check_configs(configs: Sequence[dict], names: Sequence[str]) -> None:
    first = configs[0]
    if first.get("peft_type") != "LORA" or first.get("use_dora"):
        kind = "DoRA" if first.get("use_dora") else first.get("peft_type")
        raise LmforgeError(f"{names[0]}: a {kind} adapter; averaging is defined for LoRA adapters")
    for config, name in zip(configs[1:], names[1:]):
        for key in SHARED_KEYS:
            a, b = first.get(key), config.get(key)
            if key in ("target_modules", "modules_to_save") and isinstance(a, list) and isinstance(b, list):
                a, b = sorted(a), sorted(b)
            if a != b:
                raise LmforgeError(f"{name}: adapter_config.json key '{key}' is {b!r}, {names[0]} has {a!r}; "
                                   f"only adapters trained alike can be averaged")


def average_lora(configs: Sequence[dict], tensors: Sequence[dict[str, torch.Tensor]],
                 weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The one LoRA adapter whose update is the weighted average of the members' updates.

    Args:
        configs: each member's ``adapter_config.json`` (peft's LoRA config).
        tensors: each member's ``adapter_model.safetensors`` tensors (peft names).
        weights: the members' weights (normalised to sum 1); default equal.
        names: the members' names for messages (default ``adapter 1..n``).

    Returns:
        ``(config, tensors)``: rank ``n r`` with ``alpha'`` keeping the scale, the ``lora_A`` /
        ``lora_B`` (and ``lora_embedding_A`` / ``_B``) pairs concatenated as in the module
        docstring, every other tensor averaged; tensors in the first member's dtype.
    """
    n = len(configs)
    if n < 2 or len(tensors) != n:
        raise LmforgeError(f"average: needs two or more adapters (got {n} configs, {len(tensors)} weight sets)")
    names = list(names or [f"adapter {i + 1}" for i in range(n)])
    w = member_weights(weights, n)
    _check_configs(configs, names)
    keys = set(tensors[0])
    for t, name in zip(tensors[1:], names[1:]):
        if set(t) != keys:
            odd = sorted(keys ^ set(t))[0]
            raise LmforgeError(f"{name}: tensor '{odd}' is in one adapter and not the other; "
                               f"only adapters trained alike can be averaged")
    out: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        members = [t[key] for t in tensors]
        for m, name in zip(members[1:], names[1:]):
            if m.shape != members[0].shape:
                raise LmforgeError(f"{name}: tensor '{key}' has shape {tuple(m.shape)}, "
                                   f"{names[0]} has {tuple(members[0].shape)}")
        dtype = members[0].dtype
        if ".lora_A." in key or ".lora_embedding_A" in key:  # (r, d_in) -> (n r, d_in)
            out[key] = torch.cat([m.float() for m in members], dim=0).to(dtype)
        elif ".lora_B." in key or ".lora_embedding_B" in key:  # (d_out, r) -> (d_out, n r), weighted
            out[key] = torch.cat([wi * m.float() for wi, m in zip(w, members)], dim=1).to(dtype)
        elif members[0].is_floating_point():
            out[key] = sum(wi * m.float() for wi, m in zip(w, members)).to(dtype)
        else:
            raise LmforgeError(f"{names[0]}: tensor '{key}' is not floating point; cannot average it")
    config = dict(configs[0])
    r, alpha = int(config["r"]), float(config.get("lora_alpha", 8))
    config["r"] = n * r
    config["lora_alpha"] = alpha * (math.sqrt(n) if config.get("use_rslora") else n)
    return config, out


def checkpoint_as_adapter(trainable: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                          where: str) -> dict[str, torch.Tensor]:
    """A step checkpoint's trainable tensors under peft's saved names.

    A checkpoint stores the model's trainable parameters by parameter name: adapter layers as
    ``<path>.lora_A.weight``, task heads kept through ``modules_to_save`` as ``<path>.trained.<t>``;
    peft saves them as ``base_model.model.<path>.lora_A.weight`` and ``base_model.model.<path>.<t>``.
    The renamed set must be exactly the run's final adapter's (``reference``), shape for shape:
    anything else (a full fine-tune, another adapter kind, a different run) is refused, naming it.
    """
    from .base import PEFT_PREFIX

    out: dict[str, torch.Tensor] = {}
    for name, t in trainable.items():
        path, sep, rest = name.partition(".trained.")
        out[PEFT_PREFIX + (f"{path}.{rest}" if sep else name)] = t
    if set(out) != set(reference):
        extra, missing = sorted(set(out) - set(reference)), sorted(set(reference) - set(out))
        what = (f"has tensor '{extra[0]}' that the run's adapter does not" if extra
                else f"lacks the run's adapter tensor '{missing[0]}'")
        raise LmforgeError(f"{where}: the checkpoint {what}; only LoRA runs' checkpoints can be averaged")
    for key, t in out.items():
        if t.shape != reference[key].shape:
            raise LmforgeError(f"{where}: tensor '{key}' has shape {tuple(t.shape)}, "
                               f"the run's adapter has {tuple(reference[key].shape)}")
    return out


def read_lora_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of a peft adapter folder, read as :func:`load_adapter` reads it."""
    from .peft_io import read_adapter_config, read_tensors

    return read_adapter_config(folder), read_tensors(Path(folder))
