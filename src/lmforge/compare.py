"""Run several classification methods on one train/test split and tabulate them.

A compare recipe names a shared base run config and the methods as overrides of it::

    name: compare_sst2             # results go to <output_dir>/<name>/
    output_dir: runs
    overwrite: false               # replace earlier method runs of the same names
    base:                          # a complete `classify` run config
      task: classify
      model: {name: minilm}
      data: {train: ..., eval: ...}
    methods:                       # method name -> overrides (nested mappings or dotted keys)
      full: {classify: {method: finetune, mode: full}, train.max_steps: 200}
      setfit: {classify.method: setfit}
      dora: {classify.mode: adapter, adapter: {kind: dora, r: 8}}   # adapter kinds compare the same way

Every method trains into ``<output_dir>/<name>/<method>/`` (a normal run directory: ``lmforge eval``
and ``predict`` work on it) and is then evaluated on the base's eval split. The training time
excludes model loading and evaluation; inference samples/s is the evaluation pass over the test
split. Methods may not change the split (``data.train``, ``data.eval``, filters, eval sampling,
columns, labels; nor ``seed`` when the test split is a seeded fraction of train or a seeded sample).
``comparison.md`` and ``comparison.json`` are rewritten after every method.
"""
from __future__ import annotations

import copy
import gc
import json
import logging
import math
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from .config import PlainName, RunConfig, Section, apply_overrides, build_config, dump_config, read_yaml
from .errors import LmforgeError
from .rundir import is_run_dir, read_config

log = logging.getLogger("lmforge")

SPLIT_KEYS = {"train", "eval", "eval_fraction", "where", "max_eval_samples", "columns", "labels"}


class CompareRecipe(Section):
    """A comparison: a shared base config and per-method overrides."""

    name: PlainName = "compare"
    output_dir: str = "runs"
    overwrite: bool = False
    base: dict[str, Any]
    methods: dict[str, dict[str, Any]] = Field(min_length=1)

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def read_compare(path: str | Path, overrides: list[str] | tuple = ()) -> CompareRecipe:
    """Load a compare recipe; ``overrides`` are dotted keys into it (``base.train.lr=1e-4``)."""
    raw = apply_overrides(read_yaml(path), list(overrides), source=str(path))
    try:
        recipe = CompareRecipe.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        raise LmforgeError(f"{path}: {key}: {e['msg']}") from None
    for name in recipe.methods:
        if not name or "/" in name or name.startswith("."):
            raise LmforgeError(f"{path}: methods: '{name}' must be a plain folder name")
    return recipe


def _expand(overrides: dict) -> dict:
    """Turn dotted keys into nested mappings (``{"a.b": 1}`` -> ``{"a": {"b": 1}}``)."""
    out: dict = {}
    for key, value in overrides.items():
        node = out
        parts = str(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _expand(value) if isinstance(value, dict) else value
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` merged in (mappings recursively, other values replaced); a new dict."""
    out = copy.deepcopy(base)
    for key, value in _expand(over).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def method_configs(recipe: CompareRecipe, source: str = "compare") -> dict[str, RunConfig]:
    """Validated run configs of every method (all checked before anything runs)."""
    base = build_config(recipe.base | {"name": "base"}, source=f"{source}: base")
    if base.task != "classify":
        raise LmforgeError(f"{source}: base.task must be classify (got '{base.task}')")
    if not base.data.eval and base.data.eval_fraction <= 0:
        raise LmforgeError(f"{source}: the base needs a test split (data.eval or data.eval_fraction > 0)")
    split = base.data.model_dump(include=SPLIT_KEYS)
    out = {}
    for name, over in recipe.methods.items():
        raw = deep_merge(recipe.base, over or {}) | {
            "name": name, "output_dir": str(recipe.out_dir), "overwrite": recipe.overwrite}
        cfg = build_config(raw, source=f"{source}: methods.{name}")
        if cfg.task != "classify":
            raise LmforgeError(f"{source}: methods.{name}: task must stay classify")
        changed = sorted(f"data.{k}" for k, v in cfg.data.model_dump(include=SPLIT_KEYS).items() if v != split[k])
        if (not base.data.eval or base.data.max_eval_samples) and cfg.seed != base.seed:
            changed.append("seed")  # the seed draws the eval fraction and the eval sample
        if changed:
            raise LmforgeError(f"{source}: methods.{name} changes {', '.join(changed)}: every method must use "
                               "the same train/test split")
        out[name] = cfg
    return out


def examples_used(task, cfg) -> int:
    """Labelled training examples the method learnt from."""
    method, n = cfg.classify.method, len(task.train_items)
    if method == "finetune":
        tc = cfg.train
        if tc.max_steps:
            return min(n, tc.max_steps * tc.batch_size * tc.grad_accum)
        return n
    if method == "setfit" or (method == "embedding_lr" and cfg.classify.embedding_lr.per_class):
        return int(task.sample_size)
    if method == "zero_shot":
        shots = cfg.classify.zero_shot.shots
        return sum(min(shots, sum(it["label"] == c for it in task.train_items)) for c in range(len(task.labels)))
    return n if method == "embedding_lr" else 0


def describe(cfg) -> str:
    c = cfg.classify
    mode = cfg.adapter.kind if c.mode in ("lora", "adapter") else c.mode  # adapter modes: the kind
    return {"finetune": f"finetune/{mode}", "setfit": f"setfit/{c.setfit.head}"}.get(c.method, c.method)


class _PeakRss:
    """Peak resident memory (MB) of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        import gc
        import threading

        import torch

        from .device import release_host_memory

        gc.collect()
        release_host_memory(torch.device("cpu"))  # memory freed by earlier methods: rows do not inherit it
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    try:
        import os

        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def _saved_mb(run_dir: Path) -> float | None:
    """Size of what the run saved for inference: ``adapter/`` (adapter kinds) else ``model/``."""
    for sub in ("adapter", "model"):
        folder = Path(run_dir) / sub
        if folder.is_dir():
            return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    return None


def run_method(cfg) -> dict:
    """Train one method (timed), save its run, evaluate it on the test split; return its table row."""
    from .api import train_config
    from .rundir import write_json

    with _PeakRss() as rss:
        run = train_config(cfg, eval_during_training=False)  # the test split stays out of training
    task, run_dir, train_s = run.task, run.run_dir, run.train_seconds
    report = task.evaluate(task.eval_items)
    report["train_seconds"] = train_s
    write_json(run_dir / "eval.json", report)
    params = report.get("trainable_params") or {}
    row = {"method": cfg.name, "kind": describe(cfg), "accuracy": report["accuracy"],
           "macro_f1": report["macro_f1"], "min_recall": report.get("min_recall"),
           "recall": {k: v["recall"] for k, v in report.get("per_class", {}).items()},
           "never_predicted": report.get("never_predicted", []), "train_seconds": train_s, "samples_per_s": report["samples_per_s"],
           "trainable_params": params.get("trainable"), "total_params": params.get("total"),
           "train_examples": examples_used(task, cfg), "n_test": report["n"], "run_dir": str(run_dir),
           "peak_rss_mb": rss.peak, "saved_mb": _saved_mb(run_dir)}
    write_json(run_dir / "compare_row.json", row)
    return row


def _mb(x: float | None) -> str:
    return "-" if x is None or x != x else (f"{x:.0f}" if x >= 10 else f"{x:.2f}")


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a markdown table (one row per method, in run order); rows measured with
    peak RSS and saved size add those two columns."""
    mem = any("peak_rss_mb" in r for r in rows)
    head = ("| method | kind | accuracy | macro-F1 | per-class recall | train time (s) | inference (samples/s) "
            "| trainable params | train examples |" + (" peak RSS (MB) | saved (MB) |" if mem else "") + "\n"
            "|---|---|---:|---:|---|---:|---:|---:|---:|" + ("---:|---:|" if mem else "") + "\n")
    lines = []
    for r in rows:
        share = (f" ({100 * r['trainable_params'] / r['total_params']:.3g}%)"
                 if r.get("total_params") and r.get("trainable_params") is not None else "")
        recall = " ".join(f"{k}:{v:.2f}" for k, v in (r.get("recall") or {}).items()) or "-"
        if r.get("never_predicted"):
            recall += f" (never predicted: {', '.join(r['never_predicted'])})"
        lines.append(f"| {r['method']} | {r['kind']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {recall} "
                     f"| {r['train_seconds']:.1f} | {r['samples_per_s']:.1f} "
                     f"| {_count(r['trainable_params'])}{share} | {r['train_examples']:,} |"
                     + (f" {_mb(r.get('peak_rss_mb'))} | {_mb(r.get('saved_mb'))} |" if mem else ""))
    return head + "\n".join(lines) + "\n"


def write_results(out_dir: Path, rows: list[dict], meta: dict) -> tuple[Path, Path]:
    from .rundir import write_json, write_text

    md, js = out_dir / "comparison.md", out_dir / "comparison.json"
    write_json(js, meta | {"results": rows})
    write_text(md, markdown_table(rows))
    return md, js


def run_compare(recipe: CompareRecipe, *, source: str = "compare", only: list[str] | None = None,
                reuse: bool = False) -> tuple[list[dict], Path, Path]:
    """Run the recipe's methods in order (``only``: a subset); ``reuse`` keeps a method's earlier
    result when its saved config is unchanged. Returns the rows and the markdown/JSON paths."""
    from .rundir import check_run

    cfgs = method_configs(recipe, source)
    unknown = sorted(set(only or []) - set(cfgs))
    if unknown:
        raise LmforgeError(f"{source}: unknown method(s) {unknown} (recipe has {list(cfgs)})")
    chosen = {k: v for k, v in cfgs.items() if not only or k in only}
    kept = {k: _earlier_row(cfg) for k, cfg in chosen.items() if reuse}
    for name, cfg in chosen.items():
        if kept.get(name) is None:
            check_run(cfg)  # refuse to clobber before anything runs
    first = next(iter(chosen.values()))
    meta = {"name": recipe.name, "train": first.data.train, "eval": first.data.eval,
            "eval_fraction": None if first.data.eval else first.data.eval_fraction, "seed": first.seed}
    rows: list[dict] = []
    md = js = recipe.out_dir
    for name, cfg in chosen.items():
        row = kept.get(name)
        if row is None:
            log.info("compare: %s (%s)", name, describe(cfg))
            row = run_method(cfg)
            gc.collect()
        rows.append(row)
        log.info("compare: %s accuracy %.4f, train %.1f s", name, row["accuracy"], row["train_seconds"])
        md, js = write_results(recipe.out_dir, rows, meta)
    return rows, md, js


def _earlier_row(cfg) -> dict | None:
    run_dir = cfg.run_dir
    row_file = run_dir / "compare_row.json"
    if not (row_file.is_file() and is_run_dir(run_dir)):
        return None
    import yaml

    try:  # the typed config: options added since, with their defaults, do not count as a change
        saved = yaml.safe_load(dump_config(read_config(run_dir)))
    except (LmforgeError, ValidationError, ValueError, TypeError):
        return None
    now = yaml.safe_load(dump_config(cfg))
    if not isinstance(saved, dict) or {k: v for k, v in saved.items() if k != "overwrite"} != {
            k: v for k, v in now.items() if k != "overwrite"}:
        return None
    row = json.loads(row_file.read_text(encoding="utf-8"))
    return row if isinstance(row.get("accuracy"), float) and math.isfinite(row["accuracy"]) else None
