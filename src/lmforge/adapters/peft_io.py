"""Read and write adapters in peft's folder format, for every registered kind.

A folder holds ``adapter_config.json`` (peft's config of the kind: ``LORA`` with or without
``use_dora``, ``IA3``, ``PROMPT_TUNING``; ``BOTTLENECK`` is ours, peft has no such kind) and
``adapter_model.safetensors`` (tensors named as :func:`adapter_state_dict` names them), so
``peft.PeftModel.from_pretrained`` loads what we save and :func:`load_adapter` loads what
peft saves.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lmforge.adapters.base import adapter_state_dict, remove_adapters, suffix_match
from lmforge.adapters.registry import apply_adapter, get_kind, kind_of_config
from lmforge.errors import LmforgeError
from lmforge.rundir import atomic_dir, write_json, write_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"

# peft's task-specific model classes add these heads to modules_to_save on their own.
_TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
               "QUESTION_ANS": ["qa_outputs"]}


def adapter_config(model: nn.Module, base_model_name_or_path: str, task_type: str | None) -> dict:
    """The ``adapter_config.json`` of the adapter on ``model``."""
    spec = getattr(model, "_lmforge_adapter", None)
    kind = get_kind(getattr(model, "_lmforge_adapter_kind", "lora"))
    return {"peft_type": kind.peft_type, "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
            "revision": None, "inference_mode": True,
            "modules_to_save": list(dict.fromkeys(spec.modules_to_save)) or None,
            "auto_mapping": None, **kind.peft_config(spec, model)}


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str,
                 task_type: str | None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out_dir``.

    A new folder is written whole and renamed into place; in an existing one each file is
    replaced atomically (weights first, the config last: it marks completion; other files kept).

    Returns:
        ``out_dir`` as a Path.
    """
    if getattr(model, "_lmforge_adapter", None) is None:
        raise LmforgeError("the model has no LoRA adapters to save; call apply_lora or apply_adapter first")
    out = Path(out_dir)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    config = adapter_config(model, base_model_name_or_path, task_type)
    if not out.exists():
        with atomic_dir(out) as tmp:
            write_safetensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
            write_json(tmp / CONFIG_NAME, config)
    else:
        write_safetensors(out / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_json(out / CONFIG_NAME, config)
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """Parse ``adapter_dir/adapter_config.json`` and check it describes a supported kind."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise LmforgeError(f"adapter folder not found: {folder}")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise LmforgeError(f"{path} not found: not a peft adapter folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LmforgeError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(config, dict):
        raise LmforgeError(f"{path}: expected a JSON object")
    kind_of_config(config, str(path))
    return config


def adapter_folder_kind(adapter_dir: str | os.PathLike) -> str:
    """The lmforge kind (``lora``, ``dora`` ...) of an adapter folder."""
    folder = Path(adapter_dir)
    return kind_of_config(read_adapter_config(folder), str(folder / CONFIG_NAME)).name


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter folder's tensors: safetensors, or a legacy ``.bin`` read with ``weights_only`` (no pickle code)."""
    path = folder / WEIGHTS_NAME
    try:
        if path.is_file():
            return load_file(str(path))
        legacy = folder / LEGACY_WEIGHTS_NAME
        if legacy.is_file():
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError) as err:
        raise LmforgeError(f"cannot read adapter weights in {folder}: {err}") from None
    raise LmforgeError(f"{path} not found")


def _with_task_heads(spec, config: dict, model: nn.Module, tensor_names: set[str]):
    """peft adds the task head implicitly; keep only entries the model has, and add the head
    when its weights were saved."""
    names = [n for n, _ in model.named_modules() if n]
    saved = list(dict.fromkeys(spec.modules_to_save))
    paths = ["." + k.split(".", 1)[1] if k.startswith("base_model.") else k for k in tensor_names]
    paths = ["." + p[len(".model."):] if p.startswith(".model.") else p for p in paths]
    for head in _TASK_HEADS.get(config.get("task_type") or "", []):
        if head not in saved and any(f".{head}." in p for p in paths):
            saved.append(head)
    spec.modules_to_save = [e for e in saved if any(suffix_match(n, [e]) for n in names)]
    return spec


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, *, kind: str | None = None):
    """Apply the adapter saved in ``adapter_dir`` (by lmforge or peft) to ``model``.

    Loading is strict: a missing or unexpected tensor, a shape mismatch, or a folder of another
    kind than ``kind`` (when given) raises :class:`LmforgeError` naming it, and leaves the model
    as it was.

    Returns:
        The adapter's spec (also stored as ``model._lmforge_adapter``).
    """
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    where = str(folder / CONFIG_NAME)
    found = kind_of_config(config, where)
    if kind is not None and found.name != kind:
        raise LmforgeError(f"{folder}: is a {found.name} adapter, not {kind} (adapter.kind: {kind})")
    loaded = read_tensors(folder)
    spec = _with_task_heads(found.spec_from_peft(config, model, set(loaded), where), config, model, set(loaded))
    grads = {id(p): p.requires_grad for p in model.parameters()}
    apply_adapter(model, spec)
    try:
        _copy_tensors(model, loaded, folder)
    except LmforgeError:
        remove_adapters(model, grads)  # leave the model as it was
        raise
    return spec


def _copy_tensors(model: nn.Module, loaded: dict[str, torch.Tensor], folder: Path) -> None:
    expected = adapter_state_dict(model)  # detached views sharing storage with the model
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing:
        raise LmforgeError(f"adapter in {folder} lacks tensor {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise LmforgeError(f"adapter in {folder} has unexpected tensor {unexpected[0]!r} "
                           f"({len(unexpected)} unexpected)")
    for key, target in expected.items():
        if loaded[key].shape != target.shape:
            raise LmforgeError(f"adapter tensor {key!r} has shape {tuple(loaded[key].shape)}, "
                               f"the model expects {tuple(target.shape)} (a different base model?)")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(loaded[key])


