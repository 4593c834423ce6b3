"""In-batch false negatives: identical texts inside one batch must not count as negatives."""
from __future__ import annotations

import torch
from torch import Tensor


def false_negative_keys(text_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Match keys that mask identical texts of an in-batch batch as false negatives.

    Rows are grouped when they share an anchor or positive text (transitively, within the
    batch); a row's anchor key and positive key are its group. A hard negative whose text is
    some row's anchor or positive gets that row's group (so it is masked for that group's
    anchors), otherwise a unique negative key. Fed to ``multiple_negatives_ranking_loss`` as
    ``anchor_ids`` / ``candidate_ids``: candidate ``j`` is dropped for anchor ``i`` when their
    keys match and ``j`` is not ``i``'s own positive.

    Args:
        text_ids: ``(B, C)`` integer id of each row's texts: anchor, positive, negatives
            (``C == 1``: the anchor is its own positive, unsupervised SimCSE).

    Returns:
        ``(anchor_keys (B,), candidate_keys (B, max(C, 2) - 1))`` int64.
    """
    rows = text_ids.tolist()
    n = len(rows)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, row in enumerate(rows):
        for t in row[:2]:
            if t in owner:
                parent[find(i)] = find(owner[t])
            else:
                owner[t] = i
    group = [find(i) for i in range(n)]
    width = max(len(rows[0]), 2) if rows else 2
    cand = [[group[i]] + [group[find(owner[t])] if t in owner else -(1 + i * width + c)
                          for c, t in enumerate(row[2:])] for i, row in enumerate(rows)]
    return torch.tensor(group, dtype=torch.long), torch.tensor(cand, dtype=torch.long).view(n, width - 1)
