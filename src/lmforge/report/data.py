"""Reading a run directory for the report (the analysis of what is read: :mod:`.analysis`).

Only data is read, never code: ``config.yaml`` through :mod:`lmforge.rundir` (YAML, safe loader),
``metrics.jsonl``, ``eval.json``, ``labels.json``, ``samples.jsonl``/``predictions*.jsonl`` and
``run_info.json`` as JSON, pictures under ``topics/`` as bytes inlined in the page.

Conventions a task can use to put more on the page (all optional):

- ``eval.json`` ``per_class`` + ``confusion_matrix`` (classification), ``per_type`` (NER);
- ``eval.json`` ``<name>_scatter: {"pred": [...], "gold": [...]}`` (STS predicted vs gold);
- ``eval.json`` ``samples`` or ``samples.jsonl``: rows such as ``{"input", "before", "after", "gold"}``;
- metrics named ``*kl*``, ``*entropy*``, ``reward*`` or ``rewards/*`` (preference and RL curves);
- ``topics/*.svg|png`` pictures and ``topics/topics.json`` (``[{"topic", "size", "words"}]``);
- ``run_info.json`` (written at the end of ``train``): environment (versions, device) and its hash,
  data sizes, parameter counts, peak resident memory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LmforgeError
from ..rundir import CONFIG, EVAL, METRICS

MAX_SAMPLES = 12


@dataclass
class RunData:
    """Everything the report shows about one run (plain JSON values only)."""

    path: Path
    name: str
    config: dict = field(default_factory=dict)
    config_note: str = ""
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    pictures: list[tuple[str, str, bytes]] = field(default_factory=list)  # (name, mime, bytes)
    topics: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # metrics.jsonl split "event": e.g. the engine's stop
    bad_lines: int = 0


def _read_json(path: Path, default=None):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path}: not valid JSON ({exc})") from None


def _read_jsonl(path: Path, limit: int | None = None) -> tuple[list[dict], int]:
    rows, bad = [], 0
    if not path.is_file():
        return rows, bad
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1  # a line cut by a killed process
                continue
            if isinstance(obj, dict):
                rows.append(obj)
            if limit is not None and len(rows) >= limit:
                break
    return rows, bad


def _config(run: Path) -> tuple[dict, str]:
    """The run's config as plain JSON (validated through ``rundir.read_config`` when possible)."""
    try:
        from ..rundir import read_config

        return read_config(run).model_dump(mode="json"), ""
    except (ImportError, LmforgeError) as exc:
        note = f"config not validated: {exc}" if not isinstance(exc, ImportError) else ""
    from ..config import read_yaml

    try:  # lmforge's YAML reader: an alias bomb or duplicate keys are refused, not expanded
        raw = read_yaml(run / CONFIG)
    except (OSError, LmforgeError) as exc:
        return {}, f"{run / CONFIG}: unreadable ({str(exc).splitlines()[0]})"
    return raw, note


def load_run(path: str | Path) -> RunData:
    """Read one run directory (raises one line when it is not one)."""
    run = Path(path)
    if not run.is_dir():
        raise LmforgeError(f"{run}: no such run directory")
    if not (run / CONFIG).is_file() and not (run / METRICS).is_file():
        raise LmforgeError(f"{run}: not an lmforge run directory (no {CONFIG} or {METRICS})")
    data = RunData(path=run, name=run.name)
    if (run / CONFIG).is_file():
        data.config, data.config_note = _config(run)
    rows, data.bad_lines = _read_jsonl(run / METRICS)
    data.train = [r for r in rows if r.get("split", "train") == "train"]
    data.eval = [r for r in rows if r.get("split") == "eval"]
    data.events = [r for r in rows if r.get("split") == "event"]
    final = _read_json(run / EVAL, {})
    data.final = final if isinstance(final, dict) else {}
    labels = _read_json(run / "labels.json", [])
    data.labels = [str(x) for x in labels] if isinstance(labels, list) else []
    samples = data.final.get("samples")
    if isinstance(samples, list):
        data.samples = [s for s in samples if isinstance(s, dict)][:MAX_SAMPLES]
    if not data.samples:
        data.samples = _read_jsonl(run / "samples.jsonl", MAX_SAMPLES)[0]
    if not data.samples:
        for p in sorted(run.glob("predictions*.jsonl")):
            data.samples = _read_jsonl(p, MAX_SAMPLES)[0]
            break
    env = _read_json(run / "run_info.json", {})
    data.env = env if isinstance(env, dict) else {}
    pics = data.final.get("pictures")
    names = [n for n in pics if isinstance(n, str)] if isinstance(pics, list) else []  # written by the task
    topics_dir = run / "topics"
    candidates = [run / Path(n).name for n in names]
    if topics_dir.is_dir():
        candidates += sorted(topics_dir.iterdir())
    for p in candidates:
        mime = {".svg": "image/svg+xml", ".png": "image/png"}.get(p.suffix.lower())
        if mime and p.is_file() and p.stat().st_size < 5 << 20 and p.name not in {n for n, _, _ in data.pictures}:
            data.pictures.append((p.name, mime, p.read_bytes()))
    data.topics = _topic_rows(_read_json(topics_dir / "topics.json", []))
    return data


def _topic_rows(meta) -> list[dict]:
    """``[{"topic", "size", "words"}]`` from a topic model's ``topics.json`` (a list of rows, or
    lmforge's ``{"topic_ids", "sizes", "words", "labels"}`` with string keys)."""
    if isinstance(meta, list):
        return [t for t in meta if isinstance(t, dict)]
    if not isinstance(meta, dict) or not isinstance(meta.get("topic_ids"), list):
        return []
    sizes, words, labels = (meta.get(k) if isinstance(meta.get(k), dict) else {} for k in ("sizes", "words", "labels"))
    rows = []
    for t in meta["topic_ids"]:
        ws = words.get(str(t), [])
        rows.append({"topic": labels.get(str(t)) or ("outliers" if t == -1 else str(t)), "size": sizes.get(str(t), 0),
                     "words": [w[0] if isinstance(w, list) else w for w in ws][:10]})
    return sorted(rows, key=lambda r: -(r["size"] if isinstance(r["size"], (int, float)) else 0))
