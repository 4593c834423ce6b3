"""Rollout guards of the ``rl`` task: a loud warning on a negative KL, a stop on reward collapse.

Both read one rollout's metrics (``kl``, ``kl_se``: mean and standard error of the summed k1 KL
per response; ``reward_mean``, ``reward_std``). The KL check: the sample mean of k1 is >= 0 in
expectation, so a mean below ``NEGATIVE_KL`` *and* below -2 standard errors is not noise. The
collapse rule: the reward mean staying more than ``collapse_drop`` x (the largest rollout reward
std seen) below the best mean for ``collapse_patience`` rollouts in a row.
"""
from __future__ import annotations

import logging

from ..errors import TrainingError

log = logging.getLogger("lmforge.tasks.rl")
NEGATIVE_KL = -0.1  # a mean summed k1 KL below this and below -2 standard errors is warned about (k1 is noisy)


def new_collapse_state() -> dict:
    return {"best": None, "spread": 0.0, "bad": 0}


def check_rollout(phase: int, metrics: dict, state: dict, collapse_drop: float | None, patience: int) -> None:
    """Warn on a negative KL; update the collapse ``state`` in place and raise
    :class:`TrainingError` when the reward has collapsed. A rollout without a KL (beta = 0 fast path)
    skips the KL check."""
    kl, se = metrics.get("kl", 0.0), metrics.get("kl_se", 0.0)
    if kl < NEGATIVE_KL and kl < -2 * se:
        log.warning("rl: NEGATIVE KL to the reference (%.4f per sequence, standard error %.4f) at rollout %d: the "
                    "policy samples tokens the reference finds likelier than the policy does; check the sampling "
                    "settings (top_k/top_p change what is sampled but not the scored distribution)", kl, se, phase)
    c, mean = state, metrics["reward_mean"]
    c["spread"] = max(c["spread"], metrics["reward_std"])
    c["best"] = mean if c["best"] is None else max(c["best"], mean)
    if collapse_drop is not None and c["spread"] > 0 and mean < c["best"] - collapse_drop * c["spread"]:
        c["bad"] += 1
        if c["bad"] >= patience:
            raise TrainingError(f"reward collapse: the reward mean {mean:.4f} at rollout {phase} stayed more than "
                                f"{collapse_drop:g} x {c['spread']:.4f} (rl.collapse_drop x the largest rollout reward "
                                f"std) below its best {c['best']:.4f} for {c['bad']} rollouts; run stopped")
    else:
        c["bad"] = 0
