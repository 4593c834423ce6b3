"""A cross-encoder: both texts of a pair in one input, one similarity logit out.

Slower than a bi-encoder (every pair is a forward pass) but more accurate, which is why
Augmented SBERT uses it to label new pairs and why it is used to rerank retrieved candidates.
The saved folder is a plain Hugging Face sequence-classification model with one label, which
``sentence_transformers.CrossEncoder`` also loads (sigmoid activation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batching import attention_mask, pad_sequences
from ..device import Placement
from ..errors import LmforgeError


def cross_encoder_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy on similarity logits (sentence-transformers' default for one label).

    ``L = -(1/B) sum_i [y_i log sigma(z_i) + (1 - y_i) log(1 - sigma(z_i))]``.

    Args:
        logits: ``(B,)`` pair logits ``z``.
        targets: ``(B,)`` gold similarities ``y`` in [0, 1].

    Returns:
        0-dim loss.
    """
    return F.binary_cross_entropy_with_logits(logits.float().view(-1), targets.float().view(-1))


class CrossEncoder(nn.Module):
    """A sequence-classification model with one output scoring text pairs.

    Args:
        model: ``AutoModelForSequenceClassification`` with ``num_labels == 1``.
        tokenizer: its tokenizer.
        max_length: truncation length of the joined pair, in tokens.
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_length: int = 256):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, int(max_length)

    @classmethod
    def from_pretrained(cls, ref: str | Path, *, max_length: int | None = None,
                        dropout: float | None = None) -> "CrossEncoder":
        """Load a cross-encoder folder, or start one from any encoder (a fresh one-logit head)."""
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from ..models import is_decoder_only, load_tokenizer, resolve_model
        from .encoder import set_dropout

        folder = resolve_model(str(ref))
        config = AutoConfig.from_pretrained(folder)
        if is_decoder_only(config):
            raise LmforgeError(f"{ref}: a cross-encoder needs an encoder model (BERT-like), not a decoder")
        fresh = config.num_labels != 1
        config.num_labels = 1
        if dropout is not None:
            set_dropout(config, dropout)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, config=config, dtype=torch.float32, ignore_mismatched_sizes=fresh)
        tok = load_tokenizer(folder)
        return cls(model, tok, max_length=max_length or min(getattr(tok, "model_max_length", 512) or 512, 512))

    def save(self, out_dir: str | Path) -> Path:
        from ..rundir import atomic_dir

        out = Path(out_dir)
        with atomic_dir(out) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        return out

    # ---- tokens -> logits ----------------------------------------------------------------------
    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[dict]:
        """Token ids (and segment ids when the model uses them) of each joined pair, unpadded."""
        if not pairs:
            return []
        a, b = [p[0] for p in pairs], [p[1] for p in pairs]
        enc = self.tokenizer(a, b, truncation=True, max_length=self.max_length, return_attention_mask=False)
        items = [{"input_ids": ids} for ids in enc["input_ids"]]
        if "token_type_ids" in enc:
            for it, tt in zip(items, enc["token_type_ids"]):
                it["token_type_ids"] = tt
        return items

    def collate(self, items: Sequence[dict]) -> dict[str, Tensor]:
        ids = [it["input_ids"] for it in items]
        batch = {"input_ids": pad_sequences(ids, self.tokenizer.pad_token_id),  # (B, T)
                 "attention_mask": attention_mask(ids)}  # (B, T)
        if "token_type_ids" in items[0]:
            batch["token_type_ids"] = pad_sequences([it["token_type_ids"] for it in items], 0)  # (B, T)
        return batch

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """``(B, T)`` joined pairs -> ``(B,)`` logits (fp32)."""
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits.float()[:, 0]

    def predict(self, pairs: Sequence[tuple[str, str]], *, batch_size: int = 64, placement: Placement | None = None,
                activation: bool = True, progress: bool = False) -> np.ndarray:
        """Scores of ``pairs`` in input order: ``sigmoid(logit)`` in [0, 1] (raw logits with
        ``activation=False``). Length-sorted batches, inference mode, automatic precision."""
        from ..train.logging import progress as bar_of

        place = placement or Placement.resolve()
        items = self.tokenize_pairs(pairs)
        order = sorted(range(len(items)), key=lambda i: -len(items[i]["input_ids"]))
        out = torch.empty(len(items), dtype=torch.float32)
        bar = bar_of(len(items), 0, progress, desc="score")
        was_training = self.training
        self.eval()
        self.to(place.device)
        try:
            with torch.inference_mode(), place.autocast():
                for s in range(0, len(order), batch_size):
                    idx = order[s:s + batch_size]
                    batch = {k: v.to(place.device) for k, v in self.collate([items[i] for i in idx]).items()}
                    z = self(**batch)  # (b,)
                    out[torch.as_tensor(idx)] = (torch.sigmoid(z) if activation else z).float().cpu()
                    bar.update(len(idx))
        finally:
            bar.close()
            self.train(was_training)
        return out.numpy()

    def rerank(self, query: str, documents: Sequence[str], *, top_k: int | None = None,
               batch_size: int = 64, placement: Placement | None = None) -> list[tuple[int, float]]:
        """``(document index, score)`` best first (ties by index), the ``top_k`` best if given."""
        scores = self.predict([(query, d) for d in documents], batch_size=batch_size, placement=placement)
        ranked = sorted(range(len(documents)), key=lambda i: (-scores[i], i))
        return [(i, float(scores[i])) for i in ranked[:top_k]]
