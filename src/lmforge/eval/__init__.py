"""Evaluation metrics as pure functions (numpy in, JSON-serialisable dicts out)."""
from lmforge.eval.metrics import (
    classification_report,
    ner_report,
    perplexity,
    perplexity_report,
    preference_report,
    sts_report,
)
from lmforge.eval.retrieval import rank_topk, retrieval_report
from lmforge.eval.text import bleu, rouge

__all__ = [
    "bleu",
    "classification_report",
    "ner_report",
    "perplexity",
    "perplexity_report",
    "preference_report",
    "rank_topk",
    "retrieval_report",
    "rouge",
    "sts_report",
]
