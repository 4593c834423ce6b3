"""Generation metrics: ROUGE (rouge-score) and corpus BLEU (sacrebleu)."""
from __future__ import annotations

from collections.abc import Sequence

from lmforge.errors import LmforgeError

__all__ = ["bleu", "rouge"]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _reference_lists(
    predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]
) -> list[list[str]]:
    """References as one non-empty list per prediction."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise LmforgeError("predictions and references must be lists of strings, not one string")
    if len(predictions) != len(references):
        raise LmforgeError(
            f"{len(predictions)} predictions but {len(references)} references"
        )
    if len(predictions) == 0:
        raise LmforgeError("predictions are empty: nothing to evaluate")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, r in enumerate(refs):
        if not r or not all(isinstance(x, str) for x in r):
            raise LmforgeError(
                f"sample {i}: references must be a string or a non-empty list of strings"
            )
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise LmforgeError(f"sample {i}: prediction is {type(p).__name__}, expected str")
    return refs


def rouge(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    use_stemmer: bool = True,
) -> dict:
    """Mean ROUGE-1/2/L/Lsum F-measure over samples, in [0, 1].

    Per sample and ROUGE type, ``F = 2 P R / (P + R)`` with ``P = overlap / |pred|``
    and ``R = overlap / |ref|`` over n-grams (rouge1, rouge2) or the longest common
    subsequence (rougeL; rougeLsum is the summary-level union LCS over sentences,
    which are taken to be newline-separated -- put one sentence per line, otherwise
    it equals rougeL). Tokens are lower-cased runs of ``[a-z0-9]`` (rouge-score's
    tokenizer; other scripts tokenize to nothing) and Porter-stemmed when
    ``use_stemmer``. With several references, each ROUGE type takes the maximum F
    over the references of that sample (independently per type), then the mean
    over samples.

    Args:
        predictions: N generated texts.
        references: N reference texts, or N lists of reference texts.
        use_stemmer: Porter-stem tokens before matching.

    Returns:
        ``{"rouge1", "rouge2", "rougeL", "rougeLsum", "n"}``.
    """
    from rouge_score.rouge_scorer import RougeScorer

    refs = _reference_lists(predictions, references)
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, sample_refs in zip(predictions, refs):
        per_ref = [scorer.score(ref, pred) for ref in sample_refs]  # score(target, prediction)
        for key in ROUGE_TYPES:
            totals[key] += max(s[key].fmeasure for s in per_ref)
    n = len(predictions)
    out: dict[str, float | int] = {key: float(totals[key] / n) for key in ROUGE_TYPES}
    out["n"] = n
    return out


def bleu(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    *,
    tokenize: str = "13a",
) -> dict:
    """Corpus BLEU (sacrebleu), score in [0, 100].

    ``BLEU = BP * exp(sum_{n=1..4} (1/4) log p_n)`` where ``p_n`` are the clipped
    n-gram precisions pooled over the corpus and ``BP = min(1, exp(1 - r / c))``
    (``c`` hypothesis length, ``r`` effective reference length: closest reference
    length per sentence). Samples may have different numbers of references.

    Args:
        predictions: N generated texts.
        references: N reference texts, or N lists of reference texts.
        tokenize: sacrebleu tokenizer ("13a" default, "intl", "zh", "char", "none", ...).

    Returns:
        ``{"bleu", "bp", "precisions" (4 values in [0, 100]), "sys_len", "ref_len", "n"}``.
    """
    from sacrebleu.metrics import BLEU

    refs = _reference_lists(predictions, references)
    n_streams = max(len(r) for r in refs)
    # sacrebleu wants one stream per reference slot; None pads samples with fewer refs.
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(n_streams)]
    try:
        metric = BLEU(tokenize=tokenize)
    except KeyError:  # sacrebleu's error for an unknown tokenizer name
        raise LmforgeError(f"unknown sacrebleu tokenizer {tokenize!r}") from None
    res = metric.corpus_score(list(predictions), streams)
    return {
        "bleu": float(res.score),
        "bp": float(res.bp),
        "precisions": [float(p) for p in res.precisions],
        "sys_len": int(res.sys_len),
        "ref_len": int(res.ref_len),
        "n": len(predictions),
    }
