"""Atomic checkpoints: trainable weights, optimizer, scheduler, RNG and loop position.

A checkpoint is written into ``checkpoints/.tmp-step-N`` and renamed to ``step-N`` only when
complete (the run directory's folder helpers, :mod:`lmforge.rundir`), so a write killed half-way
leaves the previous checkpoints intact; a resumed run falls back past a corrupt newest one. Only the last
``keep`` (plus the best one) are kept.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..rundir import TMP_PREFIX, commit_dir, staging_dir, write_json


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (contiguous CPU copies), each shared tensor once."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach().to("cpu").contiguous().clone()
    return out


def _rng_state() -> tuple[dict, dict]:
    np_state = np.random.get_state()
    meta = {"python": _to_json(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return meta, tensors


def _to_json(obj):
    if isinstance(obj, tuple):
        return [_to_json(o) for o in obj]
    return obj


def _to_tuple(obj):
    if isinstance(obj, list):
        return tuple(_to_tuple(o) for o in obj)
    return obj


def _set_rng_state(meta: dict, tensors: dict) -> None:
    random.setstate(_to_tuple(meta["python"]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer, scheduler,
                    loop_state: dict, keep: int, protect: int | None = None) -> Path:
    """Write ``ckpt_root/step-N`` atomically; prune older ones beyond ``keep`` (never ``protect``).

    The folder is built in ``.tmp-step-N`` (:func:`lmforge.rundir.staging_dir`) and renamed
    when complete (:func:`lmforge.rundir.commit_dir`); ``state.json`` is written last.
    """
    final = Path(ckpt_root) / f"step-{step:08d}"
    tmp = staging_dir(final)
    try:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        meta, rng_tensors = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
    except (OSError, RuntimeError) as exc:  # a full disk: torch.save and safetensors raise RuntimeError
        from ..errors import TrainingError

        shutil.rmtree(tmp, ignore_errors=True)
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        kept = list_checkpoints(ckpt_root)
        raise TrainingError(f"{final}: checkpoint write failed ({first}); run stopped, "
                            f"{'last complete checkpoint ' + kept[-1].name + ' kept' if kept else 'no checkpoint kept'}"
                            ) from None
    try:
        write_json(tmp / "state.json", {"step": step, "loop": loop_state, "scheduler": scheduler.state_dict(),
                                        "rng": meta}, indent=None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, final)
    prune(ckpt_root, keep, protect)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / "state.json").is_file())


def prune(ckpt_root: Path, keep: int, protect: int | None = None) -> None:
    for p in ckpt_root.iterdir():
        if p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
    ckpts = list_checkpoints(ckpt_root)
    for p in ckpts[:-keep]:
        if protect is None or p.name != f"step-{protect:08d}":
            shutil.rmtree(p, ignore_errors=True)


def read_checkpoint(path: Path) -> dict:
    """Read every part of a checkpoint (nothing is applied); one line naming the part that is
    missing or unreadable."""
    from ..errors import LmforgeError

    parts = {"trainable.safetensors": "weights", "optimizer.pt": "optimizer state", "state.json": "loop state",
             "rng.safetensors": "random states"}
    for name, what in parts.items():
        if not (path / name).is_file():
            raise LmforgeError(f"{path}: incomplete checkpoint, no {what} ({name})")
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        rng = load_file(str(path / "rng.safetensors"))
        _ = state["step"], state["loop"], state["scheduler"], state["rng"]
    except Exception as exc:  # truncated/garbled files of any of the four formats
        msg = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise LmforgeError(f"{path}: unreadable checkpoint ({msg})") from None
    return {"weights": weights, "optimizer": optim, "state": state, "rng": rng}


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``path``; return the loop state.

    Every file is read and checked before anything is changed, so a corrupt checkpoint leaves
    the model and optimizer as they were.
    """
    from ..errors import LmforgeError

    ck = read_checkpoint(path)
    weights = ck["weights"]
    params = dict(model.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise LmforgeError(f"{path}: checkpoint does not match the model (unknown parameter {missing[0]})")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))
    optimizer.load_state_dict(ck["optimizer"])
    state = ck["state"]
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"], ck["rng"])
    return state["loop"] | {"step": state["step"]}


def resume_from(ckpt_root: Path, model: nn.Module, optimizer, scheduler, log) -> dict | None:
    """Load the newest readable checkpoint under ``ckpt_root``; None when there is none.

    A corrupt or incomplete newest checkpoint is reported and the previous complete one used.
    """
    from ..errors import LmforgeError

    found = list_checkpoints(ckpt_root)
    if not found:
        log.warning("train.resume=true: no checkpoint in %s; starting from step 0", ckpt_root)
        return None
    errors = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path, model, optimizer, scheduler)
        except LmforgeError as err:
            errors.append(str(err))
            log.warning("train.resume=true: skipping %s", err)
            continue
        if errors:
            log.warning("train.resume=true: resumed from the previous complete checkpoint %s (step %d)",
                        path, state["step"])
        else:
            log.info("resumed from %s", path)
        return state
    raise LmforgeError(f"train.resume=true: no readable checkpoint in {ckpt_root} (newest: {errors[0]}); "
                       f"remove {ckpt_root} to start from step 0, or set overwrite=true")
