"""Checks that turn bad input into one clear line before any training starts."""
from __future__ import annotations

import contextlib
import contextvars
import math
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..config import DataConfig
from ..errors import LmforgeError
from .readers import Table, read_table


def field_column(dc: DataConfig, field: str) -> str:
    """The file column that holds a task field (``data.columns`` mapping, default: same name)."""
    return dc.columns.get(field, field)


def require_columns(table: Table, columns: Sequence[str]) -> None:
    """Every record must have every column (names the first offending record)."""
    if not table.records:
        raise LmforgeError(f"{table.source}: no examples (empty split)")
    for i, rec in enumerate(table.records):
        for c in columns:
            if c not in rec:
                have = ", ".join(list(rec)[:8])
                raise LmforgeError(f"{table.where(i)}: missing column '{c}' (columns: {have})")


def text_values(table: Table, column: str, *, allow_empty: bool = False) -> list[str]:
    """The column's values as strings; non-text values are an error naming the row."""
    out = []
    for i, rec in enumerate(table.records):
        v = rec.get(column)
        if not isinstance(v, str):
            raise LmforgeError(f"{table.where(i)}: '{column}' must be text, got {type(v).__name__} {v!r:.40}")
        if not allow_empty and not v.strip():
            raise LmforgeError(f"{table.where(i)}: '{column}' is empty")
        out.append(v)
    return out


#: inside :func:`eval_filtering`: ``{"enabled": bool, "tables": [{"source", "rows", "kept"}]}``
_EVAL_FILTER: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lmforge_eval_filter", default=None)


@contextlib.contextmanager
def eval_filtering(enabled: bool = True) -> Iterator[dict]:
    """Evaluation of a saved run: every :func:`apply_where` inside is recorded (rows read and kept
    per file, in the yielded ``{"enabled", "tables"}``), and ``enabled=False`` (``--no-filter``)
    keeps every row instead of applying the run's ``data.where``."""
    state: dict = {"enabled": enabled, "tables": []}
    token = _EVAL_FILTER.set(state)
    try:
        yield state
    finally:
        _EVAL_FILTER.reset(token)


def apply_where(table: Table, where: dict[str, list[Any]]) -> Table:
    """Keep records whose column value is in the given list (``data.where``); inside
    :func:`eval_filtering` the counts are recorded, and a filter that keeps nothing is one line."""
    if not where:
        return table
    state = _EVAL_FILTER.get()
    if state is not None and not state["enabled"]:
        state["tables"].append({"source": table.source, "rows": len(table), "kept": len(table)})
        return table
    keep = []
    for i, rec in enumerate(table.records):
        if all(rec.get(c) in set(_hashable(v) for v in vals) for c, vals in where.items()):
            keep.append(i)
    if state is not None:
        state["tables"].append({"source": table.source, "rows": len(table), "kept": len(keep)})
        if table.records and not keep:
            raise LmforgeError(f"{table.source}: the run's data.where {where} keeps none of its {len(table)} rows "
                               "(--no-filter scores every row)")
    return table.subset(keep)


def filter_summary(state: dict, where: dict[str, list[Any]]) -> dict | None:
    """``{"where", "applied", "source", "rows", "kept", "dropped"}`` of the first file an
    :func:`eval_filtering` block filtered (the file read; a carved test split is then drawn from
    the kept rows and filtered again without loss), or None when no filter was met."""
    if not state["tables"]:
        return None
    first = state["tables"][0]
    return {"where": where, "applied": state["enabled"], "source": first["source"], "rows": first["rows"],
            "kept": first["kept"], "dropped": first["rows"] - first["kept"]}


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def load_splits(dc: DataConfig, seed: int) -> tuple[Table, Table | None]:
    """Read train (and eval, or a seeded fraction of train), apply filters and sample caps."""
    if not dc.train:
        raise LmforgeError("config: missing required value 'data.train'")
    train = apply_where(read_table(dc.train), dc.where)
    if not train.records:
        raise LmforgeError(f"{dc.train}: no training examples (empty split{' after data.where' if dc.where else ''})")
    if dc.test_fraction > 0 and not dc.test:
        train = _carve_test(train, dc, seed)[0]
    if dc.eval:
        ev = apply_where(read_table(dc.eval), dc.where)
        if not ev.records:
            raise LmforgeError(f"{dc.eval}: no evaluation examples (empty split)")
    elif dc.eval_fraction > 0:
        idx = list(range(len(train)))
        random.Random(seed).shuffle(idx)
        n_eval = max(1, int(round(len(idx) * dc.eval_fraction)))
        if n_eval >= len(idx):
            raise LmforgeError(f"{dc.train}: too few examples ({len(idx)}) to split off an eval set")
        ev, train = train.subset(sorted(idx[:n_eval])), train.subset(sorted(idx[n_eval:]))
    else:
        ev = None
    if dc.max_train_samples and len(train) > dc.max_train_samples:
        idx = sorted(random.Random(seed + 1).sample(range(len(train)), dc.max_train_samples))
        train = train.subset(idx)
    if ev is not None and dc.max_eval_samples and len(ev) > dc.max_eval_samples:
        idx = sorted(random.Random(seed + 2).sample(range(len(ev)), dc.max_eval_samples))
        ev = ev.subset(idx)
    return train, ev


def _carve_test(table: Table, dc: DataConfig, seed: int) -> tuple[Table, Table]:
    """Split ``data.test_fraction`` of the (filtered) training table off as the test split:
    a seeded draw independent of the eval split's, made before it. Returns (rest, test)."""
    idx = list(range(len(table)))
    random.Random(f"test-{seed}").shuffle(idx)
    n_test = max(1, int(round(len(idx) * dc.test_fraction)))
    if n_test >= len(idx):
        raise LmforgeError(f"{dc.train}: too few examples ({len(idx)}) to hold out a test split")
    return table.subset(sorted(idx[n_test:])), table.subset(sorted(idx[:n_test]))


def load_test_split(dc: DataConfig, seed: int) -> Table | None:
    """The held-out test split (``data.test`` or the seeded ``data.test_fraction`` of train), or None."""
    if dc.test:
        test = apply_where(read_table(dc.test), dc.where)
        if not test.records:
            raise LmforgeError(f"{dc.test}: no test examples (empty split)")
        return test
    if dc.test_fraction > 0:
        if not dc.train:
            raise LmforgeError("config: data.test_fraction needs data.train")
        return _carve_test(apply_where(read_table(dc.train), dc.where), dc, seed)[1]
    return None


def label_names(train: Table, column: str, given: list[str] | None) -> list[str]:
    """Label names in a stable order: as given, else discovered (numbers numerically, else sorted)."""
    if given:
        if len(set(given)) != len(given):
            raise LmforgeError("config: data.labels has duplicate names")
        if len(given) < 2:
            raise LmforgeError("config: data.labels needs at least two labels")
        return list(given)
    for i, rec in enumerate(train.records):
        v = rec.get(column)
        if v is None:
            raise LmforgeError(f"{train.where(i)}: '{column}' is missing a label")
        if not isinstance(v, (str, int, float)) or isinstance(v, float) and not math.isfinite(v):
            raise LmforgeError(f"{train.where(i)}: '{column}' must be a label name (text or a number), got "
                               f"{type(v).__name__} {v!r:.40}")
    values = {rec.get(column) for rec in train.records}
    if len({str(v) for v in values}) < 2:
        raise LmforgeError(f"{train.source}: '{column}' has a single label ({next(iter(values))!r:.40}); "
                           "classification needs at least two")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in values) or all(
            isinstance(v, str) and v.lstrip("-").isdigit() for v in values):
        return [str(v) for v in sorted(int(v) for v in values)]
    return sorted(str(v) for v in values)


def label_ids(table: Table, column: str, names: list[str], *, split: str) -> list[int]:
    """Map each record's label to its index; unknown labels name the file and row."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, rec in enumerate(table.records):
        v = rec.get(column)
        key = str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
        if key in index:
            out.append(index[key])
        elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names) and names[0] != "0":
            out.append(int(v))  # integer labels given with names: treat as indices
        else:
            hint = "unseen in train" if split == "eval" else "not in data.labels"
            raise LmforgeError(f"{table.where(i)}: unknown label {v!r:.60} ({hint}; labels: "
                               f"{', '.join(n[:40] for n in names[:10])})")
    return out


def read_labels(folder: str | Path) -> list[str]:
    """The ``labels.json`` a classification/NER run saved: a JSON list of distinct label names.
    Missing, malformed or of the wrong shape is one line naming the file."""
    import json

    from ..config import read_text_utf8

    f = Path(folder) / "labels.json"
    if not f.is_file():
        raise LmforgeError(f"{f}: missing (did training finish?)")
    try:
        labels = json.loads(read_text_utf8(f, "labels file"))
    except json.JSONDecodeError as exc:
        raise LmforgeError(f"{f}: malformed JSON (line {exc.lineno}: {exc.msg})") from None
    if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels)
            or len(set(labels)) != len(labels)):
        raise LmforgeError(f"{f}: must be a JSON list of distinct label names")
    return labels
