"""Mixing several training sets into one stream of training items (multi-dataset training).

The engine batches and shuffles the items of one list (``task.train_items``). To train on more
than one data set, each with its own loss, every item of the primary set carries the rows of the
other sets that travel with it: a micro-batch of ``B`` primary items then holds a batch of each
set (about ``B * rate_k`` rows of set ``k``), and the task computes each set's loss on its own
homogeneous sub-batch and adds them. So every optimizer step sees every set, the way
sentence-transformers' round-robin sampler gives each data set the same number of batches
(``rate = 1``), or each set is seen once per epoch, as its proportional sampler (``rate = n_k / n_0``).
"""
from __future__ import annotations

import random
from fractions import Fraction


def mixing_rate(rate: float | str, n_primary: int, n_other: int) -> Fraction:
    """Rows of the other set per primary item, exact.

    ``"proportional"`` -> ``n_other / n_primary`` (every row of both sets once per epoch);
    a number r -> r (``1`` = one row of the other set per primary row: equal-sized batches).
    """
    if rate == "proportional":
        return Fraction(n_other, max(n_primary, 1))
    return Fraction(str(float(rate)))


def companion_rows(n_primary: int, n_other: int, *, rate: float | str | Fraction = 1, seed: int = 0) -> list[list[int]]:
    """For each of ``n_primary`` items, the row indices of another set that travel with it.

    Item ``i`` gets ``c_i = floor((i + 1) r) - floor(i r)`` rows, so the first ``m`` items hold
    ``floor(m r)`` rows in all, spread evenly (r = 1/2: items 1, 3, 5, ... hold one row each).
    Rows are taken in order from consecutive seeded permutations of ``range(n_other)``: every
    row is used once before any row repeats (a set smaller than its share is cycled, each pass
    reshuffled); a set larger than its share contributes its first ``floor(n_primary r)`` rows
    of the first permutation.

    Returns:
        ``n_primary`` lists of indices into the other set (the same for the same seed).
    """
    r = rate if isinstance(rate, Fraction) else mixing_rate(rate, n_primary, n_other)
    if r < 0:
        raise ValueError(f"mixing rate must be >= 0, got {r}")
    if n_other <= 0:
        return [[] for _ in range(n_primary)]
    rng = random.Random(seed)
    pool: list[int] = []
    out: list[list[int]] = []
    for i in range(n_primary):
        count = int((i + 1) * r) - int(i * r)  # floor of non-negative Fractions
        rows = []
        for _ in range(count):
            if not pool:  # a new pass over the other set, in a fresh seeded order
                pool = list(range(n_other))
                rng.shuffle(pool)
                pool.reverse()  # pop() from the end takes the permutation in order
            rows.append(pool.pop())
        out.append(rows)
    return out
