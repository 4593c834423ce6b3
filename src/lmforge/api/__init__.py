"""The public Python API: what the CLI, ``compare``, the demo and the benchmarks call.

    import lmforge

    run = lmforge.train("recipes/demo_rt_lora.yaml", name="rt", train={"max_steps": 50})
    run.metrics["accuracy"]                      # eval.json of the run
    run.predict(["a gorgeous film"])             # [{"text", "label", "score", "probs"}]
    run = lmforge.load("runs/rt", checkpoint="best")
    run.evaluate("data/test.jsonl")              # metrics dict (also eval_<name>.json in the run)
    vecs = lmforge.encode("minilm", ["a sentence", "another"])   # (2, 384) float32
    lmforge.generate("smollm2", ["Say hi"], max_new_tokens=8)    # ["Hi!"]

Overrides are keyword arguments: nested mappings (``train={"max_steps": 50}``) or dotted keys
(``**{"train.max_steps": 50}``), as ``key=value`` on the command line.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import LmforgeError, TrainingError

log = logging.getLogger("lmforge")


def _override_items(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        return [kv for k, v in value.items() for kv in _override_items(f"{prefix}.{k}", v)]
    return [(prefix, value)]


def config(recipe: str | Path | dict | Any, **overrides):
    """The typed run config of a recipe (a YAML path, a mapping or a RunConfig) with overrides."""
    import copy

    from ..config import RunConfig, build_config, read_yaml

    if isinstance(recipe, RunConfig):
        raw, source = recipe.model_dump(mode="json"), "config"
    elif isinstance(recipe, dict):
        raw, source = copy.deepcopy(recipe), "config"
    else:
        raw, source = read_yaml(recipe), str(recipe)
    for key, value in overrides.items():
        for dotted, v in _override_items(key, value):
            node = raw
            parts = dotted.split(".")
            for p in parts[:-1]:
                nxt = node.setdefault(p, {})
                if not isinstance(nxt, dict):
                    raise LmforgeError(f"{source}: '{dotted}' goes inside '{p}', which is not a section")
                node = nxt
            node[parts[-1]] = v
    return build_config(raw, source=source)


@dataclass
class Run:
    """A run directory with its config, its final metrics and (loaded when needed) its task."""

    run_dir: Path
    config: Any
    metrics: dict = field(default_factory=dict)
    checkpoint: str = "final"
    _task: Any = None
    train_seconds: float | None = None  # training only (no model loading or final evaluation)
    trust_remote_code: bool | None = None  # a loaded run: its config.yaml never turns remote code on

    @property
    def task(self):
        """The task of the run, ready to evaluate and predict (loaded on first use)."""
        if self._task is None:
            from ..tasks import load_task

            if self.trust_remote_code is None:  # the run this process trained
                self._task = load_task(self.run_dir, self.checkpoint)
            else:
                from ..config import loading_saved_runs

                with loading_saved_runs(self.trust_remote_code):
                    self._task = load_task(self.run_dir, self.checkpoint)
        return self._task

    def evaluate(self, data: str | Path | None = None, out: str | Path | None = None, *,
                 split: str | None = None, no_filter: bool = False) -> dict:
        """Metrics of the run on a data file (same columns as training), or on the run's own
        held-out ``split="test"`` (``data.test`` or the seeded ``data.test_fraction``, re-derived
        from its config); written to ``out`` (default ``eval_<file stem>.json`` / ``eval_test.json``
        in the run directory).

        The run's ``data.where`` filter and ``data.columns`` mapping apply as in training; the
        report says so (``data_filter``: rows read, kept, dropped; ``columns``), and
        ``no_filter=True`` scores every row. Rows the task dropped or truncated while reading
        (causal LMs) are in ``data_report``.
        """
        import tempfile

        from ..data.schema import eval_filtering, filter_summary, load_test_split
        from ..rundir import write_json, write_jsonl

        task = self.task
        dc = self.config.data
        if no_filter and split is not None and dc.where and not dc.test:
            raise LmforgeError("--no-filter with --split test: the test split is carved from the filtered training "
                               "file (data.test_fraction); score a file with --data FILE --no-filter instead")
        n_reports = len(getattr(task, "reports", None) or [])
        with eval_filtering(enabled=not no_filter) as seen:
            if split is not None:
                if split != "test":
                    raise LmforgeError(f"--split {split}: only the held-out 'test' split can be re-derived")
                table = load_test_split(dc, self.config.seed)
                if table is None:
                    raise LmforgeError(f"{self.run_dir}: the run has no test split "
                                       "(set data.test or data.test_fraction)")
                with tempfile.TemporaryDirectory() as tmp:  # the split's rows, read back as any eval file
                    write_jsonl(Path(tmp) / "test.jsonl", table.records)
                    items = task.read_eval_file(str(Path(tmp) / "test.jsonl"))
                name = "test"
            elif data is None:
                raise LmforgeError("evaluate needs a data file or split='test'")
            else:
                items = task.read_eval_file(str(data))
                name = Path(data).name.split('.')[0]
        report = task.evaluate(items)
        report |= _data_notes(dc, filter_summary(seen, dc.where), getattr(task, "reports", None) or [], n_reports)
        report["checkpoint"] = self.checkpoint
        write_json(Path(out) if out else self.run_dir / f"eval_{name}.json", report)  # as eval_report_path
        return report

    def predict(self, texts: str | Sequence[str]) -> list[dict]:
        """One prediction per text (for classification: ``label``, ``score``, ``probs``)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise LmforgeError("no texts to predict")
        return self.task.predict(texts)

    def predict_file(self, path: str | Path, out: str | Path) -> int:
        """Predict every record of a file into ``out`` (JSONL); returns the count."""
        return self.task.predict_file(str(path), str(out))


def train_config(cfg, *, eval_during_training: bool = True, on_step=None, prepare=None) -> Run:
    """Train a typed config: check the run directory, build the task (its data and model
    checked), create the run directory, train with the engine, save the artefact.

    ``eval_during_training=False`` keeps the eval split out of training (no eval steps, no
    best/): :attr:`Run.task` still has it as ``eval_items`` for the caller to evaluate.
    ``on_step(step, record)`` is called after every optimizer step (benchmarks time with it);
    ``prepare(task)`` gets the built task before training (e.g. to instrument its ``collate``).
    """
    from ..rundir import check_run, prepare_run, save_config
    from ..tasks import build_task
    from ..train import fit

    action = check_run(cfg)
    task = build_task(cfg)  # reads and checks data and model before anything is written
    if prepare is not None:
        prepare(task)
    run_dir = prepare_run(cfg, action)
    log.info("run %s: task %s on %s (%s)", run_dir, cfg.task, cfg.model.name, task.placement.describe())
    log.info(task.describe_model())
    held = None
    main = int(os.environ.get("RANK", "0")) == 0
    before = _sample_outputs(task) if main else None  # the untrained model's, for the report
    if not eval_during_training:
        held, task.eval_items = list(task.eval_items), []
    t0 = time.perf_counter()
    try:
        metrics = task.train_direct(run_dir)
        if metrics is None:
            metrics = fit(task, cfg, run_dir, on_step=on_step)  # a resumed run saves its config once resumed
        elif action == "resume":
            save_config(run_dir, cfg)
    except TrainingError:  # stopped (non-finite loss): the report shows where and why
        if int(os.environ.get("RANK", "0")) == 0:
            from ..report import report_after_training

            report_after_training(run_dir, task)
        raise
    seconds = time.perf_counter() - t0
    if held is not None:
        task.eval_items = held
    if main:
        task.save(run_dir)
        _score_test_split(run_dir, cfg)
        _add_data_report(run_dir, task)
        if before is not None:
            from ..tasks.samples import before_after

            task.sample_rows = before_after(before, _sample_outputs(task))
        from ..report import report_after_training

        report_after_training(run_dir, task)  # runs/<name>/report.html (+ run_info.json)
    return Run(run_dir, cfg, dict(metrics or {}), "final", task, seconds)


def _sample_outputs(task, n: int = 5) -> list[dict] | None:
    """The few report samples ``{"input", "output", "reference"}`` of a task: its own
    ``sample_outputs()`` (causal-LM tasks generate), else for classifiers the predicted label and
    probability of the first ``n`` eval items (one cheap forward); None for other tasks."""
    fn = getattr(task, "sample_outputs", None)
    if callable(fn):
        return fn()
    items = list(getattr(task, "eval_items", None) or [])[:n]
    if not (items and hasattr(task, "prediction_rows") and hasattr(task, "predict_items")
            and all("input_ids" in it for it in items)):
        return None
    import torch

    model = task.model
    was_training = model.training
    try:
        model.to(task.placement.device)
        with torch.no_grad():
            probs = task.predict_items(items)  # (n, C)
    except Exception as exc:  # a report nicety never stops training
        log.warning("sample predictions skipped: %s", exc)
        return None
    finally:
        model.train(was_training)
    rows = []
    for it, p in zip(items, probs.tolist()):
        k = max(range(len(p)), key=p.__getitem__)
        rows.append({"input": task.tokenizer.decode(it["input_ids"], skip_special_tokens=True),
                     "output": f"{task.labels[k]} ({p[k]:.2f})",
                     "reference": task.labels[it["label"]] if isinstance(it.get("label"), int) else None})
    return rows


def _add_data_report(run_dir: Path, task) -> None:
    """Rows the task dropped or truncated while reading its data (``task.reports``: causal-LM
    tasks' :class:`~lmforge.data.chat.DropReport`) go into ``eval.json`` as ``data_report``."""
    import json

    from ..rundir import EVAL, write_json

    reports = [r for r in getattr(task, "reports", None) or [] if r.truncated or r.dropped]
    if not reports or not (run_dir / EVAL).is_file():
        return
    final = json.loads((run_dir / EVAL).read_text(encoding="utf-8"))
    final["data_report"] = {r.split: r.as_dict() for r in reports}
    write_json(run_dir / EVAL, final)


def _score_test_split(run_dir: Path, cfg) -> None:
    """Score the held-out test split once, with the selected weights (``best/`` when a best
    metric chose a step, else the final ones), into ``eval.json`` under ``test``."""
    import json

    from ..rundir import BEST, EVAL, write_json

    if not (cfg.data.test or cfg.data.test_fraction) or not (run_dir / EVAL).is_file():
        return
    which = "best" if (run_dir / BEST).is_dir() else "final"
    report = load(run_dir, which).evaluate(split="test")
    final = json.loads((run_dir / EVAL).read_text(encoding="utf-8"))
    final["test"] = report
    write_json(run_dir / EVAL, final)
    log.info("held-out test (%s weights): %s", which,
             ", ".join(f"{k} {v:.4f}" for k, v in report.items() if isinstance(v, float))[:300])


def _data_notes(dc, filtered: dict | None, reports: list, n_before: int) -> dict:
    """What reading the eval data did, for the report and one log line each: the run's
    ``data.where`` (rows kept/dropped, or not applied), its ``data.columns`` mapping, and rows the
    task dropped or truncated (``reports[n_before:]``, :class:`lmforge.data.chat.DropReport`)."""
    notes: dict = {}
    if filtered is not None:
        notes["data_filter"] = filtered
        if filtered["applied"]:
            log.info("eval: the run's data.where %s applied to %s: %d of %d rows kept, %d dropped (--no-filter "
                     "scores every row)", filtered["where"], filtered["source"], filtered["kept"], filtered["rows"],
                     filtered["dropped"])
        else:
            log.info("eval: the run's data.where %s not applied (--no-filter): all %d rows of %s scored",
                     filtered["where"], filtered["rows"], filtered["source"])
    if dc.columns:
        notes["columns"] = dict(dc.columns)
        log.info("eval: the run's column mapping applied: %s",
                 ", ".join(f"{field} <- column '{col}'" for field, col in dc.columns.items()))
    new = reports[n_before:]
    if new:
        notes["data_report"] = {r.split: r.as_dict() for r in new}
    return notes


def train(recipe: str | Path | dict | Any, **overrides) -> Run:
    """Train a recipe (YAML path, mapping or RunConfig) with overrides; returns the :class:`Run`."""
    return train_config(config(recipe, **overrides))


def load(run_dir: str | Path, checkpoint: str = "final", *, trust_remote_code: bool = False) -> Run:
    """A finished run (``checkpoint``: ``final`` or ``best``); its task loads on first use.

    A run folder is data: a ``model.trust_remote_code: true`` in its ``config.yaml`` is refused
    unless ``trust_remote_code=True`` is passed here (or the CLI's ``--trust-remote-code``)."""
    import json

    from ..config import loading_saved_runs, remote_code_flag
    from ..rundir import EVAL, open_run

    trust = bool(trust_remote_code or remote_code_flag())
    with loading_saved_runs(trust):
        opened = open_run(run_dir, checkpoint)
    metrics = {}
    if (opened.run_dir / EVAL).is_file():
        try:
            metrics = json.loads((opened.run_dir / EVAL).read_text(encoding="utf-8"))
        except ValueError:
            metrics = {}
    return Run(opened.run_dir, opened.config, metrics, opened.checkpoint, trust_remote_code=trust)


def encode(model: str | Path, texts: str | Sequence[str], *, batch_size: int = 64, pooling: str | None = None,
           normalize: bool | None = None, max_length: int | None = None, device: str = "auto",
           precision: str = "auto"):
    """Sentence embeddings ``(N, D)`` float32 of ``texts`` with a sentence encoder (an embed run
    directory, a sentence-transformers/HF folder, a hub id or a packaged alias such as ``minilm``)."""
    from ..device import Placement
    from ..embeddings.files import load_encoder

    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise LmforgeError("no texts to encode")
    if batch_size <= 0:
        raise LmforgeError(f"batch_size must be positive, got {batch_size}")
    enc = load_encoder(str(model), pooling=pooling, normalize=normalize, max_length=max_length)
    place = Placement.resolve(device, precision)
    enc.to_inference(place)
    return enc.encode(texts, batch_size=batch_size, placement=place)


def embed_file(model: str | Path, path: str | Path, out: str | Path, *, column: str = "text", batch_size: int = 64,
               pooling: str | None = None, normalize: bool | None = None, max_length: int | None = None,
               device: str = "auto", precision: str = "auto", progress: bool = False) -> dict:
    """Embed every text of a file (.txt, one a line, or a table's ``column``) into ``out``
    (``.npy`` matrix or ``.parquet`` with text + embedding); returns ``{texts, dim, out, precision,
    sentences_per_s}`` (the rate counts encoding only)."""
    from ..device import Placement
    from ..embeddings.files import load_encoder, read_texts, write_vectors

    if Path(out).suffix.lower() not in (".npy", ".parquet"):
        raise LmforgeError(f"{out}: output must end in .npy or .parquet")
    texts = read_texts(str(path), column)  # bad input fails before the model loads
    enc = load_encoder(str(model), pooling=pooling, normalize=normalize, max_length=max_length)
    place = Placement.resolve(device, precision)
    enc.to_inference(place)
    t0 = time.perf_counter()
    vecs = enc.encode(texts, batch_size=batch_size, placement=place, progress=progress)
    dt = time.perf_counter() - t0
    write_vectors(str(out), texts, vecs)
    return {"texts": len(texts), "dim": int(vecs.shape[1]), "out": str(out), "precision": place.name,
            "sentences_per_s": round(len(texts) / max(dt, 1e-9), 1)}


# generation and model evaluation live beside this file; the public names are all here
from .evaluation import MODEL_EVAL_TASKS, eval_report_path, evaluate_model  # noqa: E402
from .generation import generate, generate_file, read_prompts  # noqa: E402

__all__ = ["MODEL_EVAL_TASKS", "Run", "config", "embed_file", "encode", "eval_report_path", "evaluate_model",
           "generate", "generate_file", "load", "read_prompts", "train", "train_config"]
