"""Atomic writers: a temporary sibling (``.tmp-*``) is written, flushed and renamed into place."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import LmforgeError
from .layout import METRICS, TMP_PREFIX


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched. ``OSError`` (exit 1: a
    read-only folder, a full disk) becomes one :class:`LmforgeError` line naming ``path``.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f"{TMP_PREFIX}{p.name}-")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
    except OSError as exc:
        raise LmforgeError(f"{p}: cannot write here ({exc.strerror or exc})", exit_code=1) from None
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
        raise LmforgeError(f"{p}: write failed ({exc.strerror or exc})", exit_code=1) from None
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
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the folder gets the usual mode
    except OSError as exc:
        raise LmforgeError(f"{final}: cannot write here ({exc.strerror or exc})", exit_code=1) from None
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
        raise LmforgeError(f"{final}: write failed ({exc.strerror or exc})", exit_code=1) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(final: str | Path) -> Path:
    """A fresh ``.tmp-<name>`` sibling of ``final`` to build a folder in (for :func:`commit_dir`).

    Unlike :func:`atomic_dir` the name is fixed, so a write killed half-way leaves one folder
    that the next write of the same ``final`` (or :func:`clean_stale_tmp`) removes.
    """
    final = Path(final)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise LmforgeError(f"{final}: cannot write here ({exc.strerror or exc})", exit_code=1) from None
    return tmp


def commit_dir(tmp: str | Path, final: str | Path) -> Path:
    """Make the folder built in ``tmp`` durable and rename it to ``final`` (replacing it)."""
    tmp, final = Path(tmp), Path(final)
    try:
        _fsync_dir(tmp)
        if final.exists():
            old = final.with_name(f"{TMP_PREFIX}{final.name}-old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        raise LmforgeError(f"{final}: write failed ({exc.strerror or exc})", exit_code=1) from None
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def truncate_metrics(run_dir: str | Path, after_step: int) -> int:
    """Drop the ``metrics.jsonl`` records of steps after ``after_step`` (a resumed run logs them
    again); returns how many were dropped. Unreadable lines are kept as they are."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            step = None
        if isinstance(step, (int, float)) and step > after_step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        write_text(path, "".join(l + "\n" for l in keep))
    return dropped


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
