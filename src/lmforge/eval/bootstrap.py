"""Percentile-bootstrap confidence intervals: one sample, and paired differences of two runs.

Given N per-item values ``x`` (e.g. 0/1 pair correctness, or reward margins), draw ``B`` index
vectors ``idx_b`` of size N with replacement from ``numpy.random.default_rng(seed)``
(``rng.integers(0, N, size=(B, N))``, the same draws as ``scipy.stats.bootstrap``), compute
``theta_b = stat(x[idx_b])`` and return the ``alpha/2`` and ``1 - alpha/2`` quantiles of the
``theta_b`` (linear interpolation, ``numpy.quantile``'s default):

    CI = [Q_{alpha/2}(theta_1..theta_B), Q_{1-alpha/2}(theta_1..theta_B)]

The paired variant resamples *items*: both runs' values on item ``i`` move together, so the
interval of ``stat(a) - stat(b)`` reflects only the disagreement between runs, not the spread of
item difficulty. Pure functions: the same inputs and seed give the same interval.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import LmforgeError

__all__ = ["bootstrap_ci", "paired_bootstrap_ci", "percentile_interval", "preference_intervals", "resample_indices"]

Stat = Callable[..., np.ndarray]


def _values(values: Sequence[float], name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise LmforgeError(f"{name}: expected a 1-d sequence of numbers, got shape {v.shape}")
    if v.size == 0:
        raise LmforgeError(f"{name}: no values to bootstrap")
    return v


def _check(n_resamples: int, alpha: float) -> None:
    if int(n_resamples) < 1:
        raise LmforgeError(f"n_resamples: must be >= 1, got {n_resamples}")
    if not 0 < alpha < 1:
        raise LmforgeError(f"alpha: must be in (0, 1), got {alpha}")


def resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """(B, N) indices drawn with replacement: ``default_rng(seed).integers(0, n, (B, n))``."""
    return np.random.default_rng(seed).integers(0, n, size=(int(n_resamples), int(n)))


def percentile_interval(thetas: Sequence[float], alpha: float = 0.05) -> tuple[float, float]:
    """``(Q_{alpha/2}, Q_{1-alpha/2})`` of a bootstrap distribution ``thetas`` (B,), linear quantiles."""
    t = np.asarray(thetas, dtype=np.float64)
    lo, hi = np.quantile(t, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float], stat: Stat = np.mean, n_resamples: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap ``1 - alpha`` interval of ``stat(values)``.

    Args:
        values: (N,) per-item values.
        stat: vectorised statistic, called as ``stat(x, axis=-1)`` on the (B, N) resamples and
            returning (B,) (``np.mean``, ``np.median``, ...).
        n_resamples: B.
        alpha: 0.05 for a 95% interval.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        ``(low, high)``; a constant sample gives ``low == high``.
    """
    _check(n_resamples, alpha)
    v = _values(values, "values")
    idx = resample_indices(v.size, n_resamples, seed)  # (B, N)
    return percentile_interval(stat(v[idx], axis=-1), alpha)  # (B,) -> 2 quantiles


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], stat: Stat = np.mean, n_resamples: int = 1000,
                        alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap ``1 - alpha`` interval of ``stat(a) - stat(b)``, two runs on the same N items.

    Each resample draws item indices ``idx_b`` (N,) once and uses them for both runs:
    ``theta_b = stat(a[idx_b]) - stat(b[idx_b])``. The interval excluding 0 says the runs differ
    on this item set at level ``alpha``.

    Args:
        a, b: (N,) per-item values of the two runs, item ``i`` of ``a`` paired with item ``i`` of ``b``.
        stat, n_resamples, alpha, seed: as :func:`bootstrap_ci`.
    """
    _check(n_resamples, alpha)
    x, y = _values(a, "a"), _values(b, "b")
    if x.size != y.size:
        raise LmforgeError(f"paired bootstrap: a has {x.size} items, b has {y.size} (they must be the same items)")
    idx = resample_indices(x.size, n_resamples, seed)  # (B, N)
    return percentile_interval(stat(x[idx], axis=-1) - stat(y[idx], axis=-1), alpha)


def preference_intervals(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float], *,
                         n_resamples: int = 1000, seed: int = 0) -> dict:
    """95% bootstrap intervals of pair accuracy and mean margin (as :func:`lmforge.eval.metrics.preference_report`).

    ``margin_i = r_chosen_i - r_rejected_i``; ``correct_i = [margin_i > 0]`` (a tie is a miss).
    Returns ``{"accuracy_ci95": [lo, hi], "margin_ci95": [lo, hi]}`` (same resamples for both).
    """
    c = _values(chosen_rewards, "chosen_rewards")
    r = _values(rejected_rewards, "rejected_rewards")
    if c.size != r.size:
        raise LmforgeError(f"chosen_rewards has {c.size} values, rejected_rewards {r.size}")
    margin = c - r  # (N,)
    acc = bootstrap_ci((margin > 0).astype(np.float64), n_resamples=n_resamples, seed=seed)
    mar = bootstrap_ci(margin, n_resamples=n_resamples, seed=seed)
    return {"accuracy_ci95": list(acc), "margin_ci95": list(mar)}
