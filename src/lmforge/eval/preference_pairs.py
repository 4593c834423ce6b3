"""Per-pair preference outcomes in file order, and the paired accuracy difference of two runs.

A preference evaluation scores N pairs with margins ``m_i = r_chosen_i - r_rejected_i`` (the
implicit DPO reward, or a reward model's score); pair ``i`` is correct when ``m_i > 0`` (a tie
is a miss, as :func:`lmforge.eval.metrics.preference_report`). :func:`pairs_in_file_order`
stores the margins by the pair's row in the file (not the length-grouped batch order), each
with a content key (:func:`pair_key`: a hash of the row), so two runs' reports on the same file
line up pair by pair whatever their batch sizes, ``max_length`` or tokenizers.

Two runs A and B on the same N pairs (matched by key), correctness ``a_i, b_i`` in {0, 1}:

    diff = mean(a) - mean(b) = (n_a_only - n_b_only) / N
    n_a_only = #{i: a_i = 1, b_i = 0},   n_b_only = #{i: a_i = 0, b_i = 1}

with the percentile-bootstrap interval of ``diff`` resampling *pairs* (one index draw for both
runs, :func:`lmforge.eval.bootstrap.paired_bootstrap_ci`): only the discordant pairs move it,
so it is much narrower than the two marginal intervals when the runs agree on most pairs.

A prediction ensemble of M runs on the same pairs (:func:`ensemble_report`, matched by key) scores
pair ``i`` by the mean of the members' margins,

    m_i = (1/M) sum_j m_ij,

the mean-reward ensemble of reward-model ensembles for RLHF (Coste et al. 2023): it assumes the
members' margins share a scale (seeds or folds of one recipe); the report gives each member's
margin standard deviation so a mismatch shows. Members of different families (a reward model's
score beside DPO's implicit reward, ``beta`` times a log-ratio) do not share one, and the raw
mean is then the larger-scale member's vote; ``scale="std"`` first divides each member's margins
by their standard deviation over the evaluated pairs (no labels used),

    m_i = (1/M) sum_j m_ij / std_k(m_kj),

so every member weighs the same and the mean margin is in those units.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LmforgeError
from .bootstrap import bootstrap_ci, paired_bootstrap_ci

__all__ = ["pair_key", "pairs_in_file_order", "paired_accuracy_difference", "read_pairs", "compare_reports",
           "ensemble_report"]


def pair_key(record: dict) -> str:
    """16 hex digits of the SHA-256 of the row as canonical JSON (sorted keys): the pair's identity."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def pairs_in_file_order(index: Sequence[int], keys: Sequence[str], margins: Sequence[float]) -> dict:
    """``{"index": [...], "key": [...], "margin": [...]}`` (N each) sorted by the file row ``index``.

    Args:
        index: (N,) row of each scored pair in the file, in the order they were scored.
        keys: (N,) :func:`pair_key` of each row, same order.
        margins: (N,) reward margin of each pair, same order.
    """
    if not len(index) == len(keys) == len(margins):
        raise LmforgeError(f"pairs: {len(index)} indices, {len(keys)} keys, {len(margins)} margins (must be equal)")
    order = sorted(range(len(index)), key=lambda i: index[i])
    return {"index": [int(index[i]) for i in order], "key": [str(keys[i]) for i in order],
            "margin": [float(margins[i]) for i in order]}


def _checked(pairs: dict, name: str) -> dict[str, float]:
    if not isinstance(pairs, dict) or not {"key", "margin"} <= set(pairs):
        raise LmforgeError(f"{name}: no per-pair outcomes (a 'pairs' object with 'key' and 'margin')")
    keys, margins = pairs["key"], pairs["margin"]
    if len(keys) != len(margins) or not keys:
        raise LmforgeError(f"{name}: 'pairs' has {len(keys)} keys and {len(margins)} margins")
    out = dict(zip(keys, (float(m) for m in margins)))
    if len(out) != len(keys):
        raise LmforgeError(f"{name}: {len(keys) - len(out)} duplicate pairs (the same row twice in the file)")
    return out


def paired_accuracy_difference(a: dict, b: dict, *, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0,
                               names: tuple[str, str] = ("a", "b")) -> dict:
    """Accuracy of A minus accuracy of B over the same pairs, with its paired bootstrap interval.

    Args:
        a, b: per-pair outcomes (:func:`pairs_in_file_order`: ``key`` and ``margin`` lists). Pairs are
            matched by key, in A's order; both must score exactly the same set of pairs.
        n_resamples, alpha, seed: of the bootstrap (1000 resamples, 95%, seed 0 by default).
        names: what to call A and B in an error message.

    Returns:
        ``{"n", "accuracy_a", "accuracy_b", "accuracy_diff", "accuracy_diff_ci95": [lo, hi],
        "a_only", "b_only"}`` (``a_only``: pairs A gets right and B wrong).
    """
    ma, mb = _checked(a, names[0]), _checked(b, names[1])
    if ma.keys() != mb.keys():
        common = len(ma.keys() & mb.keys())
        raise LmforgeError(f"{names[1]}: scores {len(mb)} pairs, {names[0]} {len(ma)}, {common} of them the same "
                           "pairs; a paired comparison needs the same pairs (evaluate both runs on the same file, "
                           "with nothing dropped)")
    keys = list(ma)
    ca = np.array([ma[k] > 0 for k in keys], dtype=np.float64)  # (N,)
    cb = np.array([mb[k] > 0 for k in keys], dtype=np.float64)  # (N,)
    lo, hi = paired_bootstrap_ci(ca, cb, n_resamples=n_resamples, alpha=alpha, seed=seed)
    return {"n": len(keys), "accuracy_a": float(ca.mean()), "accuracy_b": float(cb.mean()),
            "accuracy_diff": float(ca.mean() - cb.mean()), "accuracy_diff_ci95": [lo, hi],
            "a_only": int(((ca == 1) & (cb == 0)).sum()), "b_only": int(((ca == 0) & (cb == 1)).sum())}


ENSEMBLE_SCALES = ("raw", "std")


def ensemble_report(members: Sequence[dict], names: Sequence[str], *, scale: str = "raw", n_resamples: int = 1000,
                    seed: int = 0) -> dict:
    """The mean-margin ensemble of M >= 2 runs' per-pair outcomes on the same pairs.

    Args:
        members: M ``pairs`` objects (:func:`pairs_in_file_order`), each scoring exactly the same set
            of pairs (matched by key); the ensemble keeps the first member's order.
        names: M names, for the report and for errors.
        scale: ``"raw"`` (the members' margins as they are) or ``"std"`` (each divided by its standard
            deviation over these pairs, the equation above).
        n_resamples, seed: of the percentile bootstrap over pairs (95%).

    Returns:
        ``{"n", "scale", "accuracy", "mean_margin", "accuracy_ci95", "margin_ci95", "members": [{"name",
        "accuracy", "margin_std"}, ...], "unanimous", "pairs"}`` (``unanimous``: fraction of pairs on
        which every member is right or every member is wrong).
    """
    if scale not in ENSEMBLE_SCALES:
        raise LmforgeError(f"ensemble scale '{scale}': one of {', '.join(ENSEMBLE_SCALES)}")
    if len(members) < 2 or len(members) != len(names):
        raise LmforgeError(f"an ensemble needs >= 2 members with one name each (got {len(members)} and "
                           f"{len(names)})")
    checked = [_checked(m, str(n)) for m, n in zip(members, names)]
    keys = list(checked[0])
    for m, n in zip(checked[1:], names[1:]):
        if m.keys() != checked[0].keys():
            raise LmforgeError(f"{n}: scores {len(m)} pairs, {names[0]} {len(keys)}, "
                               f"{len(m.keys() & checked[0].keys())} of them the same pairs; an ensemble needs the "
                               "same pairs (evaluate every member on the same file, with nothing dropped)")
    margins = np.array([[m[k] for k in keys] for m in checked], dtype=np.float64)  # (M, N)
    std = margins.std(axis=1)  # (M,)
    if scale == "std":
        flat = [str(n) for n, sd in zip(names, std) if not sd > 0]
        if flat:
            raise LmforgeError(f"{flat[0]}: every margin the same, no scale to divide by (scale std)")
    mean = (margins / std[:, None] if scale == "std" else margins).mean(axis=0)  # (N,)
    right = margins > 0  # (M, N)
    first = members[0]
    index = dict(zip(first["key"], first.get("index", range(len(keys)))))
    return {"n": len(keys), "scale": scale, "accuracy": float((mean > 0).mean()), "mean_margin": float(mean.mean()),
            "accuracy_ci95": list(bootstrap_ci((mean > 0).astype(np.float64), n_resamples=n_resamples, seed=seed)),
            "margin_ci95": list(bootstrap_ci(mean, n_resamples=n_resamples, seed=seed)),
            "members": [{"name": str(n), "accuracy": float(r.mean()), "margin_std": float(sd)}
                        for n, r, sd in zip(names, right, std)],
            "unanimous": float((right.all(axis=0) | (~right).all(axis=0)).mean()),
            "pairs": {"index": [int(index[k]) for k in keys], "key": keys, "margin": [float(v) for v in mean]}}


def read_pairs(path: str | Path) -> dict:
    """The per-pair outcomes (``pairs``) of a preference evaluation report (``eval_<file>.json``, or a
    run's ``eval.json`` for its eval split)."""
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"{p}: no such report file")
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise LmforgeError(f"{p}: not a JSON report ({err})") from None
    if not isinstance(report, dict) or "pairs" not in report:
        raise LmforgeError(f"{p}: no per-pair outcomes ('pairs'); re-evaluate the run with this version "
                           "(lmforge eval RUN --data FILE)")
    _checked(report["pairs"], str(p))
    return report["pairs"]


def compare_reports(a: str | Path | dict, b: str | Path | dict, **kw) -> dict:
    """:func:`paired_accuracy_difference` of two reports (paths, or ``pairs`` objects already read)."""
    pa = a if isinstance(a, dict) else read_pairs(a)
    pb = b if isinstance(b, dict) else read_pairs(b)
    names = (kw.pop("names", None) or (str(a) if not isinstance(a, dict) else "a",
                                       str(b) if not isinstance(b, dict) else "b"))
    return paired_accuracy_difference(pa, pb, names=names, **kw)
