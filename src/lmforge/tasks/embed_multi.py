"""Multi-dataset sentence-embedding training (``embed.datasets``): more training sets, each with its
own loss, mixed into every optimizer step of an embed run.

Every item of the primary set (``data.train`` with ``embed.loss``) carries the rows of each extra
set that travel with it (:func:`lmforge.data.mixing.companion_rows`): a micro-batch of ``B``
primary rows holds about ``B * rate`` rows of each set, each set's loss is computed on its own
homogeneous sub-batch (in-batch negatives only among that set's rows) and the step minimises

    L = L_primary + sum_k weight_k * L_k

``rate: 1`` gives every set the same batch size (the share sentence-transformers' round-robin
sampler gives each data set), ``rate: proportional`` uses every row of every set once per epoch
(its proportional sampler). An epoch is one pass over the primary set.
"""
from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import Field

from ..config import Section
from ..data.mixing import companion_rows
from ..data.readers import read_table
from ..data.schema import apply_where
from ..errors import LmforgeError

EXTRA_LOSSES = ("mnr", "simcse_sup", "cosine", "cosent")


class EmbedDataset(Section):
    """One more training set of an embed run (``embed.datasets``), with its own loss."""

    name: str = Field(..., min_length=1, description="label of the set (its loss is logged as <name>_loss)")
    train: str = Field(..., description="file path, pkg://PACKAGE/path, or hf:NAME[:CONFIG]@SPLIT")
    loss: Literal["mnr", "simcse_sup", "cosine", "cosent"] = Field(..., description="this set's loss")
    columns: dict[str, str] = Field(default_factory=dict, description="loss field -> column in the file")
    where: dict[str, list[Any]] = Field(default_factory=dict, description="keep rows whose column is in the list")
    max_samples: int | None = Field(None, gt=0, description="seeded sample of this many rows")
    rate: float | Literal["proportional"] = Field(1.0, description="rows of this set per primary row: 1 = "
                                                  "same batch size; proportional = each row once per epoch")
    weight: float = Field(1.0, gt=0, description="weight of this set's loss in the step's sum")
    scale: float | None = Field(None, gt=0, description="mnr / cosent similarity scale (default embed.scale)")
    score_range: tuple[float, float] | None = Field(None, description="cosine / cosent gold score range "
                                                    "(default embed.score_range)")


def load_extra_sets(task, sets: list[EmbedDataset], n_primary: int, seed: int) -> list[list[int]]:
    """Read, filter, sample and tokenise every extra set; attach to each primary item ``i`` its
    companion rows as ``task.train_items[i]["extra"] = [rows of set 0, rows of set 1, ...]``.
    Returns the number of rows each set contributes per epoch, for the log."""
    names = [s.name for s in sets]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise LmforgeError(f"embed.datasets: the name '{dup}' is used twice")
    per_set = []
    for k, ds in enumerate(sets):
        where = f"embed.datasets[{k}] ({ds.name})"
        if isinstance(ds.rate, float) and ds.rate <= 0:
            raise LmforgeError(f"{where}.rate: must be > 0 or 'proportional', got {ds.rate}")
        table = apply_where(read_table(ds.train), ds.where)
        if not table.records:
            raise LmforgeError(f"{where}: {ds.train} has no rows{' after its where filter' if ds.where else ''}")
        if ds.max_samples and len(table) > ds.max_samples:
            table = table.subset(sorted(random.Random(f"{seed}-{ds.name}").sample(range(len(table)),
                                                                                    ds.max_samples)))
        try:
            rows = task.rows_for(table, ds)
        except LmforgeError as err:
            raise LmforgeError(f"{where}: {err}") from None
        plan = companion_rows(n_primary, len(rows), rate=ds.rate, seed=seed + 1000 * (k + 1))
        for item, idx in zip(task.train_items, plan):
            item.setdefault("extra", []).append([rows[j] for j in idx])
        per_set.append(sum(len(p) for p in plan))
    return per_set
