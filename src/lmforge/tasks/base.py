"""The task protocol: what a task gives the engine."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..config import RunConfig
from ..device import Placement


class Task:
    """A task owns the model and the data; the engine owns the loop.

    Subclasses set ``self.model``, ``self.train_items`` (a list of tokenised examples) and
    implement :meth:`collate`, :meth:`loss` and :meth:`evaluate`. ``self.model`` may be
    replaced by a DDP wrapper while training; use it for forward passes.
    """

    name = "task"
    cfg: RunConfig
    placement: Placement
    model: nn.Module
    train_items: Sequence[dict] = ()
    eval_items: Sequence[dict] = ()

    def item_length(self, item: dict) -> int:
        """Length used for length-grouped batching."""
        return len(item["input_ids"])

    def collate(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def batch_units(self, batch: dict) -> int:
        """How many loss units (samples by default; tokens for LM losses) the batch holds.

        The engine weighs micro-batches by their units so gradient accumulation and DDP give
        the same gradient as one big batch.
        """
        return int(batch["input_ids"].shape[0])

    def batch_tokens(self, batch: dict) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss over the batch's units, plus metrics to log."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        """Metrics on the eval data (the engine logs them and tracks the best)."""
        return {}

    def save(self, out_dir: Path) -> None:
        """Write the trained artefact (adapter folder or model folder) into ``out_dir``."""
        raise NotImplementedError

    def train_direct(self, run_dir: Path) -> dict[str, Any] | None:
        """Methods that train without gradient steps (e.g. embeddings + logistic regression)
        override this and return their eval metrics; the default (None) means: use the engine."""
        return None

    def describe(self) -> str:
        return self.name
