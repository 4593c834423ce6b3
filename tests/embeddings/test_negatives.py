"""False-negative keys of an in-batch batch, by hand."""
from __future__ import annotations

import torch

from lmforge.embeddings.negatives import false_negative_keys


def test_false_negative_keys_by_hand():
    # rows: (x, p), (x, q) share an anchor; (y, p) shares row 0's positive; (z, r) stands alone;
    # negatives: row 0's is q (row 1's positive), others are unseen texts
    ids = torch.tensor([[0, 1, 2], [0, 2, 7], [3, 1, 8], [4, 5, 9]])
    anchor, cand = false_negative_keys(ids)
    g = anchor.tolist()
    assert g[0] == g[1] == g[2] != g[3]
    assert cand[:, 0].tolist() == g
    assert cand[0, 1].item() == g[1]  # q is an in-batch positive: masked for its group
    assert len({cand[1, 1].item(), cand[2, 1].item(), cand[3, 1].item()}) == 3
    assert all(cand[i, 1].item() < 0 for i in (1, 2, 3))
    a1, c1 = false_negative_keys(torch.tensor([[4], [6], [4]]))  # SimCSE: text is its own positive
    assert a1.tolist()[0] == a1.tolist()[2] != a1.tolist()[1] and c1.shape == (3, 1)
