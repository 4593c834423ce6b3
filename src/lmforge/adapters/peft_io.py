"""Read and write LoRA adapters in peft's folder format.

A folder holds ``adapter_config.json`` (a peft ``LoraConfig``) and
``adapter_model.safetensors`` (tensors named as :func:`lora_state_dict` names them), so
``peft.PeftModel.from_pretrained`` loads what we save and :func:`load_adapter` loads what
peft saves.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.adapters.lora import (PEFT_PREFIX, LoraLinear, LoraSpec, _replace, _suffix_match,
                                   _wrappers, apply_lora, lora_state_dict)
from lmforge.errors import LmforgeError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"

# peft's task-specific model classes add these heads to modules_to_save on their own.
_TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
               "QUESTION_ANS": ["qa_outputs"]}
# Config fields meaning a LoRA variant this module does not implement, with their neutral value.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                "exclude_modules": None, "target_parameters": None,
                "trainable_token_indices": None, "layer_replication": None, "use_qalora": False}


def _adapter_config(spec: LoraSpec, base_model_name_or_path: str, task_type: str | None) -> dict:
    """The fields peft's ``LoraConfig`` reads (only ones known to peft >= 0.10)."""
    target = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": target,
        "use_rslora": spec.use_rslora,
        "modules_to_save": list(dict.fromkeys(spec.modules_to_save)) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "auto_mapping": None,
    }


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str,
                 task_type: str | None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out_dir``.

    Files are written to a temporary folder next to ``out_dir`` first; a new folder is then
    renamed into place, an existing one gets each file replaced (other files are kept).

    Returns:
        ``out_dir`` as a Path.
    """
    spec = getattr(model, "_lmforge_lora", None)
    if spec is None:
        raise LmforgeError("the model has no LoRA adapters to save; call apply_lora first")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in lora_state_dict(model).items()}
    config = _adapter_config(spec, base_model_name_or_path, task_type)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if not out.exists():
            os.replace(tmp, out)
        else:
            os.replace(tmp / WEIGHTS_NAME, out / WEIGHTS_NAME)  # config last: it marks completion
            os.replace(tmp / CONFIG_NAME, out / CONFIG_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """Parse ``adapter_dir/adapter_config.json`` and check it describes a LoRA adapter."""
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
    if config.get("peft_type", "LORA") != "LORA":
        raise LmforgeError(f"{path}: peft_type {config['peft_type']!r} is not supported (only LORA)")
    for key in ("r", "target_modules"):
        if config.get(key) is None:
            raise LmforgeError(f"{path}: missing key {key!r}")
    return config


def _spec_from_config(config: dict, model: nn.Module, tensor_names: set[str], where: Path) -> LoraSpec:
    for key, neutral in _UNSUPPORTED.items():
        value = config.get(key, neutral)
        if value not in (neutral, None) and not (neutral is None and value in ([], {})):
            raise LmforgeError(f"{where}: {key}={value!r} is not supported")
    names = [n for n, _ in model.named_modules() if n]
    saved = list(dict.fromkeys(config.get("modules_to_save") or []))
    # peft adds the task head implicitly; wrap it only when its weights were saved.
    paths = ["." + k[len(PEFT_PREFIX):] for k in tensor_names if ".lora_" not in k]
    for head in _TASK_HEADS.get(config.get("task_type") or "", []):
        if head not in saved and any(f".{head}." in p for p in paths):
            saved.append(head)
    saved = [e for e in saved if any(_suffix_match(n, [e]) for n in names)]
    target = config["target_modules"]
    try:
        return LoraSpec(r=int(config["r"]), alpha=float(config.get("lora_alpha", 8)),
                        dropout=float(config.get("lora_dropout") or 0.0),
                        target_modules=target if isinstance(target, str) else list(target),
                        use_rslora=bool(config.get("use_rslora", False)), modules_to_save=saved)
    except (TypeError, ValueError) as err:
        raise LmforgeError(f"{where}: bad value ({err})") from None


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
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


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> LoraSpec:
    """Apply the LoRA adapter saved in ``adapter_dir`` (by lmforge or peft) to ``model``.

    Loading is strict: a missing or unexpected tensor, or a shape mismatch, raises
    :class:`LmforgeError` naming it.

    Returns:
        The adapter's :class:`LoraSpec` (also stored as ``model._lmforge_lora``).
    """
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    loaded = _read_tensors(folder)
    spec = _spec_from_config(config, model, set(loaded), folder / CONFIG_NAME)
    grads = {id(p): p.requires_grad for p in model.parameters()}
    apply_lora(model, spec)
    try:
        _copy_tensors(model, loaded, folder)
    except LmforgeError:
        _remove_wrappers(model, grads)  # leave the model as it was
        raise
    return spec


def _remove_wrappers(model: nn.Module, grads: dict[int, bool]) -> None:
    for name, m in _wrappers(model):
        _replace(model, name, m.base if isinstance(m, LoraLinear) else m.original)
    for p in model.parameters():
        p.requires_grad_(grads.get(id(p), p.requires_grad))
    del model._lmforge_lora


def _copy_tensors(model: nn.Module, loaded: dict[str, torch.Tensor], folder: Path) -> None:
    expected = lora_state_dict(model)  # detached views sharing storage with the model
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing:
        raise LmforgeError(f"adapter in {folder} lacks tensor {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise LmforgeError(f"adapter in {folder} has unexpected tensor {unexpected[0]!r} "
                           f"({len(unexpected)} unexpected)")
    with torch.no_grad():
        for key, target in expected.items():
            source = loaded[key]
            if source.shape != target.shape:
                raise LmforgeError(f"adapter tensor {key!r} has shape {tuple(source.shape)}, "
                                   f"the model expects {tuple(target.shape)}")
            target.copy_(source)
