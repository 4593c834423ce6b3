"""Typed run configs: YAML recipes, dotted ``key=value`` overrides, one-line validation errors.

A recipe names its ``task``; each task registers a :class:`RunConfig` subclass that adds its
own section (``classify:``, ``sft:`` ...). Shared sections: ``model``, ``data``, ``train``,
``lora``. Unknown keys, wrong types, missing values and out-of-choice values raise
:class:`~lmforge.errors.LmforgeError` naming the key and the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import LmforgeError


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              coerce_numbers_to_str=True)  # `name=2024`, `labels: [0, 1]` are text


class ModelConfig(Section):
    """Which model, on which device, at which precision."""

    name: str = Field(description="local folder, hub id, .gguf file or packaged alias (minilm, smollm2)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto", description="attention kernel; auto picks the faster one for the device and precision")
    frozen_in_compute_dtype: bool = Field(
        True, description="store frozen weights in the autocast dtype (bf16/fp16): no per-step casts, less memory")


class DataConfig(Section):
    """Where the examples come from and how their columns map to the task's fields."""

    train: str | None = Field(None, description="file path, pkg://PACKAGE/path, or hf:NAME[:CONFIG]@SPLIT")
    eval: str | None = None
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="seeded split when eval is not given")
    columns: dict[str, str] = Field(default_factory=dict, description="task field -> column in the file")
    labels: list[str] | None = Field(None, description="label names in order; discovered (sorted) if unset")
    where: dict[str, list[Any]] = Field(default_factory=dict, description="keep rows whose column is in the list")
    max_length: int = Field(128, gt=0)
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(None, gt=0)


class TrainConfig(Section):
    """The training engine's knobs (shared by every task)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0)
    group_by_length: bool = True
    eval_every: int | None = Field(None, gt=0, description="steps between evaluations (and at the end)")
    save_every: int | None = Field(None, gt=0, description="steps between checkpoints")
    keep_last: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    best_metric: str | None = Field(None, description="eval metric tracked for the best checkpoint")
    greater_is_better: bool = True
    resume: bool = False
    progress: bool = True


class LoraConfig(Section):
    """LoRA hyper-parameters (peft's names)."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str | None = Field(None, description="suffixes or a regex; task default if unset")
    use_rslora: bool = False
    modules_to_save: list[str] | None = None


class RunConfig(Section):
    """A run: task, model, data, training and adapter settings."""

    task: str
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 42
    overwrite: bool = Field(False, description="replace an existing run directory of the same name")
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain folder name")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


TASK_CONFIGS: dict[str, type[RunConfig]] = {}


def register_task_config(task: str):
    """Class decorator: register the RunConfig subclass used for ``task``."""

    def deco(cls: type[RunConfig]) -> type[RunConfig]:
        TASK_CONFIGS[task] = cls
        return cls

    return deco


def _fmt_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"]) or "<root>"
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    if e["type"] == "missing":
        return f"{source}: missing required value '{key}'"
    got = e.get("input")
    got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    return f"{source}: {key}: {e['msg']}{got_s}"


def apply_overrides(raw: dict, overrides: list[str], source: str = "overrides") -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise LmforgeError(f"{source}: override '{item}' is not key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise LmforgeError(f"{source}: '{key}' goes inside '{p}', which is not a section")
            node = nxt
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            node[parts[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with a one-line error for missing/malformed files."""
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise LmforgeError(f"{p}:{where} malformed YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{p}: a recipe must be a YAML mapping")
    return data


def build_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a raw dict into the task's RunConfig subclass."""
    import importlib

    importlib.import_module("lmforge.tasks")  # plugin discovery: task modules register their configs

    task = raw.get("task")
    if task is None:
        raise LmforgeError(f"{source}: missing required value 'task'")
    cls = TASK_CONFIGS.get(task)
    if cls is None:
        raise LmforgeError(f"{source}: task: unknown task '{task}' (choose from {sorted(TASK_CONFIGS)})")
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise LmforgeError(_fmt_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | tuple = ()) -> RunConfig:
    """Load a recipe, apply overrides and validate it."""
    raw = apply_overrides(read_yaml(path), list(overrides), source=str(path))
    return build_config(raw, source=str(path))


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what ``config show`` prints and runs save)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
