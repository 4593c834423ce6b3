"""The run directory's layout: its names, recognising a run, reading its config, choosing its artefact."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LmforgeError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
MODEL = "model"
BEST = "best"
EVAL = "eval.json"
TMP_PREFIX = ".tmp-"


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
    from ..config import build_config, read_yaml

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

    def step_weights(self) -> dict:
        """The trainable tensors a ``step-N`` checkpoint saved (by the model's parameter names)."""
        if self.kind != "checkpoint":
            raise LmforgeError(f"{self.run_dir}: checkpoint {self.checkpoint} is not a step checkpoint")
        from safetensors.torch import load_file

        path = self.root / "trainable.safetensors"
        try:
            return load_file(str(path))
        except Exception as exc:  # a missing, truncated or garbled file
            raise LmforgeError(f"{path}: unreadable checkpoint weights ({str(exc).splitlines()[0][:120]})") from None

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
