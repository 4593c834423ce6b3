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
import logging
import os
import shutil
import tempfile
from pathlib import Path
from dataclasses import dataclass
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

log = logging.getLogger("lmforge")


# ----------------------------------------------------------------------------- atomic writers

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


# ----------------------------------------------------------------------------- layout and reading

#: keys that may change when a run is resumed (how long, how often to evaluate/save/log, where it
#: runs); every other key changes what is trained and must equal the saved config.
RESUMABLE_KEYS = {
    "name", "output_dir", "overwrite",
    "model.device",
    "data.eval", "data.max_eval_samples",
    "train.resume", "train.epochs", "train.max_steps", "train.eval_every", "train.save_every",
    "train.keep_last", "train.log_every", "train.progress", "train.eval_batch_size",
    "train.best_metric", "train.greater_is_better",
}
RESUME_KEY = "train.resume=true"


def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` is an lmforge run directory: a folder with a ``config.yaml`` whose top
    level is a mapping naming a ``task`` (and not a Hugging Face model folder's ``config.json``)."""
    p = Path(path)
    if not (p.is_dir() and (p / CONFIG).is_file()) or (p / "config.json").is_file():
        return False
    try:
        with open(p / CONFIG, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    return any(line.startswith(b"task:") for line in head.splitlines())


def read_config(run_dir: str | Path):
    """The typed :class:`~lmforge.config.RunConfig` saved in ``run_dir`` (one-line errors).

    This is the only reader of a run's ``config.yaml``.
    """
    from .config import build_config, read_yaml

    p = Path(run_dir)
    cfg_file = p / CONFIG
    if not p.is_dir():
        raise LmforgeError(f"{p}: no such run directory")
    if not cfg_file.is_file():
        raise LmforgeError(f"{p}: not an lmforge run directory (no {CONFIG})")
    try:
        raw = read_yaml(cfg_file)
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{cfg_file}: not UTF-8 text (byte {exc.start})") from None
    return build_config(raw, source=str(cfg_file))


def task_section(cfg) -> Any:
    """The task's own config section (``cfg.sft``, ``cfg.classify`` ...) or None."""
    return getattr(cfg, str(cfg.task), None)


@dataclass(frozen=True)
class OpenRun:
    """A validated run directory and the artefact chosen from it.

    Attributes:
        run_dir: the run directory.
        config: its typed config.
        checkpoint: ``"final"``, ``"best"`` or ``"step-N"``.
        root: the folder holding the chosen artefact and its task extras (``labels.json``,
            ``head/`` ...): ``run_dir``, ``run_dir/best`` or ``checkpoints/step-N``.
        artefact: ``root/adapter``, ``root/model`` or the checkpoint folder; None when the run
            keeps no weights of its own (e.g. zero-shot prototypes).
        kind: ``"adapter"`` (PEFT folder), ``"model"`` (Hugging Face / sentence-transformers
            folder), ``"checkpoint"`` (trainable weights of a step) or None.
    """

    run_dir: Path
    config: Any
    checkpoint: str
    root: Path
    artefact: Path | None
    kind: str | None

    @property
    def mode(self) -> str | None:
        """The task section's ``mode`` (``full``, ``lora``, ``qlora`` ...) when it has one."""
        return getattr(task_section(self.config), "mode", None)

    @property
    def base_4bit(self) -> bool:
        """The run trained adapters on a 4-bit NF4 base (``mode: qlora``)."""
        return self.mode == "qlora"

    @property
    def quant_block_size(self) -> int:
        return int(getattr(task_section(self.config), "quant_block_size", 64) or 64)

    def file(self, name: str) -> Path:
        """A task extra next to the chosen artefact (``labels.json``, ``head`` ...)."""
        return self.root / name

    def require(self, kind: str) -> Path:
        """The artefact folder, which must be of ``kind`` (``adapter`` or ``model``)."""
        if self.kind != kind or self.artefact is None:
            where = self.root / kind
            have = f" (it has {self.kind}/)" if self.kind in (ADAPTER, MODEL) else ""
            raise LmforgeError(f"{where}: missing in the run{have}; did training finish?")
        return self.artefact


def _artefact(root: Path) -> tuple[Path | None, str | None]:
    if (root / ADAPTER / "adapter_config.json").is_file():
        return root / ADAPTER, ADAPTER
    m = root / MODEL
    if m.is_dir() and any((m / f).is_file() for f in ("config.json", "modules.json")):
        return m, MODEL
    return None, None


def open_run(run_dir: str | Path, checkpoint: str = "final") -> OpenRun:
    """Validate a run directory and choose its artefact.

    Args:
        run_dir: the run directory.
        checkpoint: ``"final"`` (the trained artefact), ``"best"`` (the artefact kept at the best
            eval step) or ``"step-N"`` (the trainable weights saved at step N).

    Returns:
        An :class:`OpenRun` with the typed config, the chosen folder and its kind.
    """
    p = Path(run_dir)
    cfg = read_config(p)
    if checkpoint in ("final", None, ""):
        art, kind = _artefact(p)
        return OpenRun(p, cfg, "final", p, art, kind)
    if checkpoint == "best":
        root = p / BEST
        if not root.is_dir():
            raise LmforgeError(f"{p}: no {BEST}/ in the run (it is kept when train.best_metric is set); "
                               f"use checkpoint=final")
        art, kind = _artefact(root)
        return OpenRun(p, cfg, "best", root, art, kind)
    if checkpoint.startswith("step-") and checkpoint[5:].isdigit():
        step = int(checkpoint[5:])
        root = p / CHECKPOINTS / f"step-{step:08d}"
        if not (root / "state.json").is_file():
            have = ", ".join(f"step-{int(c.name[5:])}" for c in sorted((p / CHECKPOINTS).glob("step-*"))
                             if c.name[5:].isdigit()) or "none"
            raise LmforgeError(f"{p}: no complete checkpoint step-{step} (have: {have})")
        return OpenRun(p, cfg, f"step-{step}", root, root, "checkpoint")
    raise LmforgeError(f"checkpoint '{checkpoint}': use final, best or step-N")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= _flat(v, key + ".")
        else:
            out[key] = v
    return out


def _preview(v: Any, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def config_changes(saved, new) -> list[str]:
    """Dotted keys, outside :data:`RESUMABLE_KEYS`, whose values differ between two configs."""
    a, b = _flat(saved.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    return sorted(k for k in set(a) | set(b) if k not in RESUMABLE_KEYS and a.get(k) != b.get(k))


def _main_rank() -> bool:
    """Rank 0 owns the run directory under torchrun (other ranks would see it half-made)."""
    return int(os.environ.get("RANK", "0")) == 0


def _unfinished(p: Path) -> bool:
    """A run that stopped before it saved anything: no checkpoint, artefact, best/ or eval.json."""
    return not ((p / EVAL).exists() or (p / BEST).exists() or _artefact(p)[1]
                or any((p / CHECKPOINTS).glob("step-*")))


def check_run(cfg) -> str:
    """Decide, before anything is built or written, what :func:`prepare_run` will do.

    Returns ``"new"``, ``"resume"``, ``"overwrite"`` or ``"restart"`` (the run directory holds a
    run that stopped before it saved anything). Raises one line when the directory cannot be
    used: it exists without resume/overwrite, ``overwrite=true`` on a folder that is not an
    lmforge run, or ``train.resume=true`` with a config that changes what is trained.
    """
    p = cfg.run_dir
    resume = cfg.train.resume
    if p.exists() and not p.is_dir():
        raise LmforgeError(f"{p}: exists and is not a folder; choose another name= or output_dir=")
    empty = not p.exists() or not any(x for x in p.iterdir() if not x.name.startswith(TMP_PREFIX))
    if empty:
        if resume:
            log.warning("%s: nothing to resume (no run yet); %s starts from step 0", p, RESUME_KEY)
        return "new"
    if not is_run_dir(p):
        what = "train.resume=true" if resume else "overwrite=true" if cfg.overwrite else "train"
        raise LmforgeError(f"{p}: exists and is not an lmforge run (no {CONFIG} naming a task); {what} "
                           f"will not touch it; choose another name= or output_dir=")
    if resume:
        saved = read_config(p)
        changed = config_changes(saved, cfg)
        if changed:
            a, b = _flat(saved.model_dump(mode="json")), _flat(cfg.model_dump(mode="json"))
            diff = "; ".join(f"{k}: {_preview(a.get(k))} -> {_preview(b.get(k))}" for k in changed[:6])
            more = f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""
            raise LmforgeError(f"{p}: {RESUME_KEY} refused, the config changes what is trained: {diff}{more}; "
                               f"resume with the saved config or start a new name=")
        return "resume"
    if cfg.overwrite:
        return "overwrite"
    if _unfinished(p):
        return "restart"
    raise LmforgeError(f"{p}: run directory exists; set {RESUME_KEY}, overwrite=true or a new name=")


def prepare_run(cfg, action: str | None = None) -> Path:
    """Create (or reuse) the run directory of ``cfg`` and save its resolved config.

    Call after the new run's config, data and model have been checked. ``action`` is what
    :func:`check_run` returned (checked again when None):

    - ``new``/``restart``/``overwrite``: the folder is built as ``.tmp-<name>-*`` holding
      ``config.yaml`` and then renamed over ``run_dir``; an old run is moved aside and removed
      only once the new one is in place.
    - ``resume``: stale temporary files are removed and ``config.yaml`` is rewritten (the check
      has passed, so only resumable keys differ).

    Only rank 0 writes; other ranks get the path.
    """
    from .config import dump_config

    p = cfg.run_dir
    if not _main_rank():
        return p
    action = action or check_run(cfg)
    if action == "resume":
        clean_stale_tmp(p)
        clean_stale_tmp(p / CHECKPOINTS)
        write_text(p / CONFIG, dump_config(cfg))
        return p
    if action in ("overwrite", "restart"):
        log.warning("%s: replacing the %s run", p, "previous" if action == "overwrite" else "unfinished")
    clean_stale_tmp_of(p)
    with atomic_dir(p) as tmp:
        write_text(tmp / CONFIG, dump_config(cfg))
    return p


def clean_stale_tmp_of(path: str | Path) -> list[Path]:
    """Remove ``.tmp-<name>-*`` siblings of ``path`` left by a killed write of ``path``."""
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for q in path.parent.glob(f"{TMP_PREFIX}{path.name}-*"):
            shutil.rmtree(q, ignore_errors=True) if q.is_dir() else q.unlink(missing_ok=True)
            removed.append(q)
    return removed
