"""Training a cross-encoder with the shared engine (Augmented SBERT's first stage).

:class:`CrossEncoderTask` is a task the ``augsbert`` task runs inside its own run; it is not a
recipe task of its own, so it is not registered.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..device import Placement
from ..embeddings.cross_encoder import CrossEncoder, cross_encoder_loss
from .base import Task


class CrossEncoderTask(Task):
    """Cross-encoder regression on scored pairs (targets in [0, 1], binary cross-entropy) for the engine."""

    name = "cross_encoder"

    def __init__(self, cfg, model: CrossEncoder, placement, pairs: Sequence[tuple[str, str]], scores: Sequence[float],
                 eval_pairs: Sequence[tuple[str, str]] = (), eval_scores: Sequence[float] = ()):
        self.cfg, self.model, self.placement = cfg, model, placement
        self.train_items = [it | {"score": float(y)} for it, y in zip(model.tokenize_pairs(pairs), scores)]
        self.eval_pairs, self.eval_scores = list(eval_pairs), list(eval_scores)
        self.eval_items = [{"pair": p} for p in self.eval_pairs]

    def collate(self, items: Sequence[dict]) -> dict:
        return self.model.collate(items) | {"scores": torch.tensor([it["score"] for it in items])}  # (B,)

    def loss(self, batch: dict):
        feats = {k: v for k, v in batch.items() if k != "scores"}
        return cross_encoder_loss(self.model(**feats), batch["scores"]), {}

    def evaluate(self, items=None) -> dict:
        from ..eval.metrics import sts_report

        pred = self.model.predict(self.eval_pairs, placement=self.placement)
        return {f"cross_{k}": v for k, v in sts_report(pred, self.eval_scores).items()}

    def save(self, out_dir: Path) -> None:
        self.model.save(Path(out_dir) / "model")


def train_cross_encoder(model: CrossEncoder, pairs: Sequence[tuple[str, str]], scores: Sequence[float], cfg,
                        run_dir: str | Path, *, eval_pairs: Sequence[tuple[str, str]] = (),
                        eval_scores: Sequence[float] = (), placement: Placement | None = None) -> dict:
    """Train ``model`` on gold ``pairs`` with scores in [0, 1] using the shared engine.

    Args:
        cfg: a run config whose ``train`` section sets epochs, batch size, learning rate ...
        run_dir: where the engine writes ``metrics.jsonl`` / ``eval.json``; the trained
            cross-encoder is saved to ``run_dir/model``.
        eval_pairs, eval_scores: optional gold pairs to report Spearman/Pearson on.

    Returns:
        The final evaluation metrics (``cross_spearman`` ... when eval pairs are given).
    """
    from ..train import fit

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = CrossEncoderTask(cfg, model, placement or Placement.resolve(cfg.model.device, cfg.model.precision),
                            pairs, scores, eval_pairs, eval_scores)
    metrics = fit(task, cfg, run_dir)
    task.save(run_dir)
    return metrics
