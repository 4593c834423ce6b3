"""Which evaluators an embed run uses (pure choices on tables, no task state): the files of
``embed.sts_eval`` / ``embed.retrieval_eval``, held-out rows of the training format (by loss),
and a file handed to ``lmforge eval`` (by its columns).
"""
from __future__ import annotations

from ..data.readers import Table
from ..data.schema import field_column, label_ids, require_columns, text_values
from ..embeddings.evaluators import (AlignUniformEvaluator, Evaluator, NLIAccuracyEvaluator, STSEvaluator,
                                     normalised_scores, retrieval_from_file, retrieval_from_pairs, sts_from_file)
from ..errors import LmforgeError


def file_option_evaluators(sts_eval: str | None, retrieval_eval: str | None,
                           score_range: tuple[float, float]) -> tuple[list[Evaluator], list[dict]]:
    """The evaluators of ``embed.sts_eval`` (named ``sts``) and ``embed.retrieval_eval`` (``ir``),
    and their inputs as rows (for the report's samples)."""
    out: list[Evaluator] = []
    items: list[dict] = []
    if sts_eval:
        sts = sts_from_file(sts_eval, name="sts", score_range=score_range)
        out.append(sts)
        items += [{"sentence1": a, "sentence2": b} for a, b in zip(sts.s1, sts.s2)]
    if retrieval_eval:
        ir = retrieval_from_file(retrieval_eval, name="ir")
        out.append(ir)
        items += [{"query": q} for q in ir.queries]
    return out, items


def split_evaluators(table: Table, cols: list[str], loss: str, dc, score_range: tuple[float, float],
                     labels: list[str] | None = None, head=None, *, name: str = "dev") -> list[Evaluator]:
    """Evaluators on held-out rows of the training format of ``loss``: STS Spearman (cosine,
    cosent), NLI accuracy through the trained ``head`` (softmax_nli), alignment/uniformity of the
    texts (simcse_unsup, tsdae), else retrieval of each anchor's positive among all positives (and
    negatives) plus alignment/uniformity of the pairs. ``cols``: the text columns in loss order;
    ``dc``: anything with ``columns`` (a data section)."""
    require_columns(table, cols)
    texts = [text_values(table, c) for c in cols]
    if loss in ("cosine", "cosent"):
        scores = normalised_scores(table, field_column(dc, "score"), score_range)
        return [STSEvaluator(texts[0], texts[1], scores, name=name)]
    if loss == "softmax_nli":
        ids = label_ids(table, field_column(dc, "label"), labels, split="eval")
        return [NLIAccuracyEvaluator(texts[0], texts[1], ids, head, name=name)]
    if loss in ("simcse_unsup", "tsdae"):
        return [AlignUniformEvaluator(texts[0], [], name=name)]
    return [retrieval_from_pairs(texts[0], texts[1], texts[2] if len(texts) > 2 else (), name=name),
            AlignUniformEvaluator(texts[0], texts[1], name=name)]


def file_evaluators(table: Table, score_range: tuple[float, float]) -> list[Evaluator]:
    """Evaluators for a file handed to ``lmforge eval``, chosen by its columns: sentence1/sentence2/
    score (STS), anchor|query/positive[/negative] (retrieval + alignment/uniformity), text
    (alignment/uniformity)."""
    cols = table.columns()
    if {"sentence1", "sentence2", "score"} <= set(cols):
        require_columns(table, ["sentence1", "sentence2", "score"])
        return [STSEvaluator(text_values(table, "sentence1"), text_values(table, "sentence2"),
                             normalised_scores(table, "score", score_range), name="sts")]
    if {"anchor", "positive"} <= set(cols) or {"query", "positive"} <= set(cols):
        q = "anchor" if "anchor" in cols else "query"
        a, p = text_values(table, q), text_values(table, "positive")
        return [retrieval_from_pairs(a, p, text_values(table, "negative") if "negative" in cols else (),
                                     name="ir"), AlignUniformEvaluator(a, p, name="pairs")]
    if "text" in cols:
        return [AlignUniformEvaluator(text_values(table, "text"), [], name="texts")]
    raise LmforgeError(f"{table.source}: cannot tell what to evaluate from columns {', '.join(cols[:8])} "
                       "(expected sentence1/sentence2/score, anchor|query/positive, or text)")
