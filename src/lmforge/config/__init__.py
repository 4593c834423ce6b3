"""Typed run configs: YAML recipes, dotted ``key=value`` overrides, one-line validation errors.

A recipe names its ``task``; each task registers a :class:`RunConfig` subclass that adds its
own section (``classify:``, ``sft:`` ...). Shared sections: ``model``, ``data``, ``train``,
``adapter`` (``kind`` + that kind's options; the old ``lora`` section is read as
``adapter: {kind: lora}``). Unknown keys, wrong types, missing values and out-of-choice values raise
:class:`~lmforge.errors.LmforgeError` naming the key and the file.
"""
from __future__ import annotations

import contextlib
import contextvars
import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import LmforgeError
from .reading import MAX_YAML_NODES, PREVIEW, load_yaml_text, preview, read_text_utf8, read_yaml  # noqa: F401

def plain_name(value: str) -> str:
    """A folder name safe to join under an output folder: no path separators, no ``..``, not absolute,
    not hidden. Raises ValueError (pydantic turns it into a one-line config error)."""
    if (not value or "/" in value or "\\" in value or value.startswith(".") or "\0" in value
            or len(value) > 200 or Path(value).is_absolute()):
        raise ValueError("must be a plain folder name (no '/', '..', absolute path or leading '.')")
    return value


PlainName = Annotated[str, AfterValidator(plain_name)]

DEVICE_RE = re.compile(r"^(auto|cpu|mps|meta|(cuda|xpu)(:\d+)?)$")


def check_device(value: str) -> str:
    """A device string lmforge can place a model on (auto, cpu, cuda, cuda:N, mps, xpu[:N])."""
    if not isinstance(value, str) or not DEVICE_RE.match(value):
        raise ValueError(f"unknown device {preview(value)} (use auto, cpu, cuda, cuda:N, mps)")
    return value


# ---- remote code: a run folder someone hands you is data, never code ----------------------------------
_REMOTE_CODE_FLAG: contextvars.ContextVar[bool | None] = contextvars.ContextVar("lmforge_remote_code", default=None)


@contextlib.contextmanager
def loading_saved_runs(trust_remote_code: bool) -> Iterator[None]:
    """While a command loads a saved run (eval, predict, merge, generate, embed ...), a
    ``model.trust_remote_code: true`` in the run's ``config.yaml`` is not obeyed: the config is
    refused in one line unless the command line itself passed ``--trust-remote-code``, and only
    that flag turns remote code on (configs built inside the block get the flag's value)."""
    token = _REMOTE_CODE_FLAG.set(bool(trust_remote_code))
    try:
        yield
    finally:
        _REMOTE_CODE_FLAG.reset(token)


def remote_code_flag() -> bool | None:
    """The command's ``--trust-remote-code`` while it loads saved runs or models; None outside
    such a command (training a recipe, the Python API): then the config's own value applies."""
    return _REMOTE_CODE_FLAG.get()


REMOTE_CODE_REFUSAL = ("model.trust_remote_code=true is not obeyed from a run folder (it would run code shipped with "
                       "the model); pass --trust-remote-code to the command if you trust it")


def remote_code_allowed(from_config: bool, source: str = "config.yaml") -> bool:
    """The ``trust_remote_code`` to use for a model named by a saved run's config: the command's
    flag inside :func:`loading_saved_runs` (refusing a config that asks for it without the flag),
    else the config's own value (a recipe the user runs)."""
    flag = _REMOTE_CODE_FLAG.get()
    if flag is None:
        return bool(from_config)
    if from_config and not flag:
        raise LmforgeError(f"{source}: {REMOTE_CODE_REFUSAL}")
    return flag


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              coerce_numbers_to_str=True,  # `name=2024`, `labels: [0, 1]` are text
                              allow_inf_nan=False)         # `epochs: .inf`, `lr: .nan` are errors


class ModelConfig(Section):
    """Which model, on which device, at which precision."""

    name: str = Field(description="local folder, hub id, .gguf file or packaged alias (minilm, smollm2)")
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto", description="int8: int8 products of an encoder's frozen linear layers on the CPU (tasks topics "
                            "and classify)")
    device: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto", description="attention kernel; auto picks the faster one for the device and precision")
    frozen_in_compute_dtype: bool = Field(
        True, description="store frozen weights in the autocast dtype (bf16/fp16): no per-step casts, less memory")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

    @model_validator(mode="after")
    def _remote_code(self) -> "ModelConfig":
        flag = _REMOTE_CODE_FLAG.get()
        if flag is not None:  # a saved run being loaded: only the command's flag counts
            if self.trust_remote_code and not flag:
                raise ValueError(REMOTE_CODE_REFUSAL)
            object.__setattr__(self, "trust_remote_code", flag)
        return self


class DataConfig(Section):
    """Where the examples come from and how their columns map to the task's fields."""

    train: str | None = Field(None, description="file path, pkg://PACKAGE/path, or hf:NAME[:CONFIG]@SPLIT")
    eval: str | None = None
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="seeded split when eval is not given")
    test: str | None = Field(None, description="held-out test file: scored once at the end with the selected "
                                               "weights into eval.json's `test`, never used for selection")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="seeded share of data.train held out as the "
                                 "test split (carved before the eval split) when data.test is not given")
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
    activation_checkpointing: bool = Field(False, description="recompute block activations in the backward "
                                           "pass: less memory for long sequences, about one more forward of compute")
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


class AdapterConfig(Section):
    """The adapter a task trains (``mode: lora``/``adapter``): ``kind`` plus that kind's options
    (``lmforge.adapters.<kind>``'s spec fields). Options of another kind are an error."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())
    kind: str = Field("lora", description="lora | dora | ia3 | prompt | bottleneck")

    @model_validator(mode="after")
    def _kind_options(self):
        from pydantic_core import PydanticCustomError

        from ..adapters.registry import validate_options

        targets = (self.model_extra or {}).get("target_modules")
        if isinstance(targets, str):  # a regular expression over module names
            try:
                re.compile(targets)
            except re.error as exc:
                raise PydanticCustomError("adapter", "target_modules: not a valid regular expression ("
                                          + str(exc).replace("{", "(").replace("}", ")") + ")") from None
        try:
            typed = validate_options(self.kind, dict(self.model_extra or {}))
        except LmforgeError as err:
            raise PydanticCustomError("adapter", str(err).removeprefix("adapter.").replace("{", "(")
                                      .replace("}", ")")) from None
        self.__pydantic_extra__.update(typed)
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The kind's options as given (unset ones take the kind's or the task's defaults)."""
        return dict(self.model_extra or {})


_LORA_NOTE: list[bool] = []


def _lora_note() -> None:
    if not _LORA_NOTE:
        _LORA_NOTE.append(True)
        import logging

        logging.getLogger("lmforge").warning("the 'lora:' recipe section is deprecated; write "
                                             "'adapter: {kind: lora, ...}' (read as that now)")


INT8_TASKS = ("topics", "classify")  # encoder tasks with int8 products of frozen layers (model.precision: int8)


class RunConfig(Section):
    """A run: task, model, data, training and adapter settings."""

    task: str
    name: PlainName = "run"
    output_dir: str = "runs"
    seed: int = Field(42, ge=0, lt=2**63, description="a non-negative integer (torch takes 64-bit seeds)")
    overwrite: bool = Field(False, description="replace an existing run directory of the same name")
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    lora: LoraConfig | None = Field(None, exclude=True, description="deprecated: read as adapter: {kind: lora}")

    @model_validator(mode="after")
    def _legacy_lora(self):
        """An old ``lora:`` section becomes ``adapter:`` options (its values win), with one note."""
        if self.lora is not None:
            _lora_note()
            given = self.lora.model_dump(include=self.lora.model_fields_set)
            merged = {"kind": self.adapter.kind, **self.adapter.options, **given}
            try:
                self.__dict__["adapter"] = AdapterConfig.model_validate(merged)
            except ValidationError as err:
                from pydantic_core import PydanticCustomError

                raise PydanticCustomError("adapter", err.errors()[0]["msg"]) from None
            self.__dict__["lora"] = None
        return self

    @field_validator("model")
    @classmethod
    def _int8_for_inference(cls, v: ModelConfig, info):
        """``precision: int8`` runs the products of an encoder's frozen linear layers in int8 (topics: all of
        them; classify: the base under the adapter or head); other tasks refuse it."""
        from pydantic_core import PydanticCustomError

        task = str(info.data.get("task"))
        if v.precision == "int8" and task not in INT8_TASKS:
            raise PydanticCustomError("precision", f"precision int8 is for encoder tasks ({', '.join(INT8_TASKS)}); task "
                                      f"'{task}': use auto, fp32, bf16 or fp16")
        return v

    @field_validator("adapter")
    @classmethod
    def _adapter_for_task(cls, v: AdapterConfig, info):
        """A kind the task cannot use is refused (naming the tasks that can)."""
        from pydantic_core import PydanticCustomError

        from ..adapters.registry import check_task

        try:
            check_task(v.kind, str(info.data.get("task")))
        except LmforgeError as err:
            raise PydanticCustomError("adapter", str(err).removeprefix("adapter.")) from None
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


def _fmt_error(err: ValidationError, source: str, overrides: dict[str, str] | None = None) -> str:
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    key = ".".join(preview(p, 40)[1:-1] if len(p) > 40 else p for p in loc) or "<root>"
    source = _override_source(loc, overrides) or source
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    if e["type"] == "missing":
        return f"{source}: missing required value '{key}'"
    got = e.get("input")
    got_s = f" (got {preview(got)})" if got is not None and not isinstance(got, dict) else ""
    msg = e["msg"] if len(e["msg"]) <= 200 else e["msg"][:200] + "..."
    return f"{source}: {key}: {msg}{got_s}"


def _override_source(loc: list[str], overrides: dict[str, str] | None) -> str | None:
    """``override 'train.lr=x'`` when the failing key (or a key inside it) was set on the command line."""
    for key, item in (overrides or {}).items():
        parts = key.split(".")
        n = min(len(parts), len(loc))
        if n and parts[:n] == loc[:n]:
            return f"override {preview(item)}"
    return None


def apply_overrides(raw: dict, overrides: list[str], source: str = "overrides") -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise LmforgeError(f"{source}: override {preview(item)} is not key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise LmforgeError(f"override {preview(item)}: empty key part in {preview(key)}")
        node = raw
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise LmforgeError(f"override {preview(item)}: '{preview(key)[1:-1]}' goes inside '{p}', "
                                   "which is not a section")
            node = nxt
        try:
            node[parts[-1]] = load_yaml_text(value, f"override {preview(item)}") if value != "" else None
        except LmforgeError as exc:
            if "alias" in str(exc) or "duplicate key" in str(exc):
                raise
            node[parts[-1]] = value
    return raw


def build_config(raw: dict, source: str = "config", overrides: dict[str, str] | None = None) -> RunConfig:
    """Validate a raw dict into the task's RunConfig subclass.

    Args:
        raw: the nested config.
        source: what errors name (the recipe file).
        overrides: dotted key -> ``key=value`` item given on the command line; an error in such a
            key names the override instead of ``source``.
    """
    import importlib

    importlib.import_module("lmforge.tasks")  # plugin discovery: task modules register their configs

    if not isinstance(raw, dict):
        raise LmforgeError(f"{source}: a config must be a mapping")
    task = raw.get("task")
    src = _override_source(["task"], overrides) or source
    if task is None:
        raise LmforgeError(f"{source}: missing required value 'task'")
    if not isinstance(task, str):
        raise LmforgeError(f"{src}: task: must be one task name, got {preview(task)} "
                           f"(choose from {sorted(TASK_CONFIGS)})")
    cls = TASK_CONFIGS.get(task)
    if cls is None:
        raise LmforgeError(f"{src}: task: unknown task {preview(task)} (choose from {sorted(TASK_CONFIGS)})")
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise LmforgeError(_fmt_error(err, source, overrides)) from None


def override_keys(overrides: list[str] | tuple) -> dict[str, str]:
    """Dotted key -> the ``key=value`` item, for error messages that name the override."""
    return {item.split("=", 1)[0].strip(): item for item in overrides if "=" in item}


def load_config(path: str | Path, overrides: list[str] | tuple = ()) -> RunConfig:
    """Load a recipe, apply overrides and validate it."""
    raw = apply_overrides(read_yaml(path), list(overrides), source=str(path))
    return build_config(raw, source=str(path), overrides=override_keys(overrides))


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what ``config show`` prints and runs save)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
