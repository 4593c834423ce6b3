"""The one owner of the run-directory layout and of every atomic writer.

A run directory ``runs/<name>/`` holds::

    config.yaml        the resolved config (written once the run has started cleanly)
    metrics.jsonl      one JSON object per logged step (+ tensorboard/)
    checkpoints/       step-N folders, written as .tmp-step-N and renamed
    adapter/ | model/  the trained artefact (PEFT adapter folder or Hugging Face folder)
    best/              the artefact at the best eval step (when a best metric is tracked)
    eval.json          the final metrics
    ...                task extras (labels.json, head/, topics/, index/, report.html)

Every file a command writes goes through the writers below: a temporary sibling (``.tmp-*``)
is written, flushed and renamed into place, so a killed process never leaves a half-written
file under the final name. Nothing here imports anything above ``config``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import LmforgeError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
MODEL = "model"
BEST = "best"
EVAL = "eval.json"
TMP_PREFIX = ".tmp-"


# ----------------------------------------------------------------------------- atomic writers

@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched. ``OSError`` (a
    read-only folder, a full disk) becomes one :class:`LmforgeError` line naming ``path``.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f"{TMP_PREFIX}{p.name}-")
    except OSError as exc:
        raise LmforgeError(f"{p}: cannot write here ({exc.strerror or exc})") from None
    ok = False
    try:
        kw = {} if "b" in mode else {"encoding": encoding}
        with os.fdopen(fd, mode, **kw) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        ok = True
    except OSError as exc:
        raise LmforgeError(f"{p}: write failed ({exc.strerror or exc})") from None
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as fh:
        fh.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path, "wb") as fh:
        fh.write(data)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically (numpy/torch scalars become floats)."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write one JSON object per line atomically; returns the number of rows."""
    n = 0
    with atomic_file(path) as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n")
            n += 1
    return n


def write_array(path: str | Path, array) -> None:
    """Write a numpy array as ``.npy`` atomically."""
    import numpy as np

    with atomic_file(path, "wb") as fh:
        np.save(fh, np.asarray(array), allow_pickle=False)


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a dict of torch tensors as safetensors atomically."""
    from safetensors.torch import save

    write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``final`` when the block succeeds.

    On an exception the temporary folder is removed and ``final`` is untouched. An existing
    ``final`` is moved aside first and removed only after the new folder is in place.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{TMP_PREFIX}{final.name}-"))
    except OSError as exc:
        raise LmforgeError(f"{final}: cannot write here ({exc.strerror or exc})") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if final.exists():
            old = final.with_name(f"{TMP_PREFIX}{final.name}-old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.replace(old, final)
        raise LmforgeError(f"{final}: write failed ({exc.strerror or exc})") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_stale_tmp(folder: str | Path) -> list[Path]:
    """Remove ``.tmp-*`` leftovers of a killed write inside ``folder`` (ours by name); returns them."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.glob(f"{TMP_PREFIX}*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------- layout and reading

def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` looks like an lmforge run directory (a ``config.yaml`` with a ``task``)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file() and not (p / "config.json").is_file()
