"""Creating, overwriting and resuming a run directory without losing data."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import LmforgeError
from .layout import BEST, CHECKPOINTS, CONFIG, EVAL, TMP_PREFIX, _artefact, is_run_dir, read_config
from .writers import atomic_dir, clean_stale_tmp, write_text

log = logging.getLogger("lmforge")

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
    if not _main_rank():  # rank 0 owns the folder (others could see it half-replaced)
        return "resume" if resume else "new"
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
        try:
            saved = read_config(p)
        except LmforgeError as err:
            raise LmforgeError(f"{RESUME_KEY}: the saved run cannot be read: {err}", exit_code=err.exit_code) from None
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
    - ``resume``: stale temporary files are removed; ``config.yaml`` is left as it is until the
      resumed run has loaded its checkpoint (:func:`save_config`), so a failed resume never
      rewrites it.

    Only rank 0 writes; other ranks get the path.
    """
    from ..config import dump_config

    p = cfg.run_dir
    if not _main_rank():
        return p
    action = action or check_run(cfg)
    if action == "resume":
        clean_stale_tmp(p)
        clean_stale_tmp(p / CHECKPOINTS)
        return p
    if action in ("overwrite", "restart"):
        log.warning("%s: replacing the %s run", p, "previous" if action == "overwrite" else "unfinished")
    clean_stale_tmp_of(p)
    with atomic_dir(p) as tmp:
        write_text(tmp / CONFIG, dump_config(cfg))
    return p


def save_config(run_dir: str | Path, cfg) -> None:
    """(Re)write ``config.yaml`` of a run that has started cleanly (a resumed run: once its
    checkpoint is loaded; only resumable keys can differ from the saved one). Rank 0 only."""
    from ..config import dump_config

    if _main_rank():
        write_text(Path(run_dir) / CONFIG, dump_config(cfg))


def clean_stale_tmp_of(path: str | Path) -> list[Path]:
    """Remove ``.tmp-<name>-*`` siblings of ``path`` left by a killed write of ``path``."""
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for q in path.parent.glob(f"{TMP_PREFIX}{path.name}-*"):
            shutil.rmtree(q, ignore_errors=True) if q.is_dir() else q.unlink(missing_ok=True)
            removed.append(q)
    return removed
