"""Settings of task ``rl`` (the recipe's ``rl:`` section); see :mod:`lmforge.tasks.rl`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import RunConfig
from .causal import CausalSection


class RlConfig(CausalSection):
    """RL options (``rl:`` section)."""

    algorithm: Literal["ppo", "rloo", "grpo"] = "ppo"
    reward: str | list[str] = Field(description="a classify or reward run folder, or a Python function text -> "
                                                "float by dotted name (package.module.function); a list of them: "
                                                "the mean of their scores (an ensemble, e.g. one reward recipe's "
                                                "seeds)")
    reward_label: str | None = Field(None, description="classify run: the label whose score is the reward")
    reward_score: Literal["prob", "logit"] = Field("prob", description="classify run: probability or logit")
    reward_scale: float = Field(1.0, description="the reward is scale x score (e.g. -1 to minimise a score)")
    generations: int | None = Field(None, gt=0, description="responses per prompt (k); default 1 for ppo, 4 else")
    rollout_prompts: int = Field(8, gt=0, description="prompts per rollout")
    ppo_epochs: int | None = Field(None, gt=0, description="optimisation passes over a rollout; 4 for ppo, 1 else")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    generation_batch_size: int = Field(32, gt=0)
    kl_coef: float = Field(0.05, ge=0, description="beta (the start value when adaptive)")
    kl_estimator: Literal["k1", "k3"] | None = Field(None, description="k1 for ppo/rloo rewards, k3 for grpo's loss")
    kl_target: float | None = Field(None, gt=0, description="adaptive KL: target KL per sequence")
    kl_horizon: int = Field(10000, gt=0)
    clip_range: float = Field(0.2, gt=0)
    clip_range_high: float | None = Field(None, gt=0, description="upper clip (DAPO clip-higher); default clip_range")
    clip_range_value: float | None = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool | None = Field(None, description="default: true for ppo, false else")
    entropy_coef: float = Field(0.0, ge=0)
    ratio_threshold: float = Field(10.0, gt=1, description="skip a minibatch whose mean probability ratio is above")
    collapse_drop: float | None = Field(3.0, gt=0, description="stop when the reward mean stays this many rollout "
                                                                "reward stds (the largest seen) below its best (None: off)")
    collapse_patience: int = Field(3, gt=0)
    log_samples: int = Field(4, ge=0, description="generations per rollout written to samples/")
    merged_generation: bool = Field(True, description="sample with the adapters folded into the base weights: "
                                                      "into the decode's packed weights when generation's fast "
                                                      "path applies, else into copies (restored after)")
    sampler: Literal["multinomial", "inverse_cdf"] = Field("inverse_cdf", description="rollout sampling draws: "
                                                           "inverse_cdf (same distribution, cheaper) or multinomial")
    fast_rollout: bool = Field(True, description="skip the old-log-prob forward when a rollout is exactly one "
                                                 "optimizer step (the ratio is 1 by construction) and the reference "
                                                 "forward when kl_coef is a fixed 0 (no KL logged then)")


class RlRun(RunConfig):
    task: Literal["rl"] = "rl"
    rl: RlConfig
