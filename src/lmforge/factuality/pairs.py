"""Preference pairs from scored answers, and the best answer as an SFT target.

For the answers ``a_1..a_N`` of one prompt with scores ``s_i``, every pair ``i < j`` with
``|s_i - s_j| > margin`` becomes ``{"prompt", "chosen": higher, "rejected": lower}`` (the rows the
``preference`` task reads unchanged); pairs within the margin (ties included) are skipped, and
so are pairs whose answers have the same normalised text. The SFT target of a prompt is its
best-scored answer (ties: higher log-probability, then the earlier sample).
"""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import LmforgeError
from .claims import normalise


def group_by_prompt(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows grouped by prompt id (``id``, else the prompt text), in first-appearance order."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get("id", r["prompt"])), []).append(r)
    return groups


def build_pairs(rows: Sequence[dict], margin: float = 0.0, *, score: str = "score",
                max_pairs_per_prompt: int | None = None) -> list[dict]:
    """Preference pairs from scored rows (each with ``prompt``, ``answer`` and ``score``).

    Within a prompt the pairs come in order of decreasing score gap (then sample order), so
    ``max_pairs_per_prompt`` keeps the clearest ones.
    """
    if margin < 0:
        raise LmforgeError(f"margin must be >= 0, got {margin}")
    out = []
    for pid, group in group_by_prompt(rows).items():
        found = []
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                a, b = group[i], group[j]
                gap = float(a[score]) - float(b[score])
                if abs(gap) <= margin or normalise(a["answer"]) == normalise(b["answer"]):
                    continue
                hi, lo = (a, b) if gap > 0 else (b, a)
                found.append((-abs(gap), i, j, {"id": pid, "prompt": a["prompt"], "chosen": hi["answer"],
                                                 "rejected": lo["answer"], "chosen_score": hi[score],
                                                 "rejected_score": lo[score]}))
        found.sort(key=lambda t: t[:3])
        out += [f[3] for f in found[:max_pairs_per_prompt]]
    return out


def best_answers(rows: Sequence[dict], *, score: str = "score") -> list[dict]:
    """``{"id", "prompt", "completion", "score"}``: each prompt's best answer (an SFT target)."""
    out = []
    for pid, group in group_by_prompt(rows).items():
        best = max(enumerate(group), key=lambda t: (float(t[1][score]), float(t[1].get("logprob", 0.0)), -t[0]))[1]
        out.append({"id": pid, "prompt": best["prompt"], "completion": best["answer"], "score": best[score]})
    return out
