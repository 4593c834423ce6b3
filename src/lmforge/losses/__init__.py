"""Pure tensor losses: language modelling, preference optimisation, sentence embeddings."""
from lmforge.losses.contrastive import (
    alignment,
    cosent_loss,
    cosine_similarity_loss,
    info_nce,
    multiple_negatives_ranking_loss,
    softmax_nli_logits,
    softmax_nli_loss,
    uniformity,
)
from lmforge.losses.lm import chunked_cross_entropy, sequence_logps, shift_labels, token_logps
from lmforge.losses.preference import bradley_terry_loss, dpo_loss, orpo_loss, preference_metrics

__all__ = [
    "alignment",
    "bradley_terry_loss",
    "chunked_cross_entropy",
    "cosent_loss",
    "cosine_similarity_loss",
    "dpo_loss",
    "info_nce",
    "multiple_negatives_ranking_loss",
    "orpo_loss",
    "preference_metrics",
    "sequence_logps",
    "shift_labels",
    "softmax_nli_logits",
    "softmax_nli_loss",
    "token_logps",
    "uniformity",
]
