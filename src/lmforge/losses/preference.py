"""Preference losses: DPO (+ cDPO, IPO, hinge), RPO's NLL term, ORPO's odds-ratio term, Bradley-Terry.

All functions are pure: they take per-sequence scores (sums or means of token
log-probabilities, see :mod:`lmforge.losses.lm`) and return per-example losses, so the
caller chooses the reduction. Notation: ``pi`` is the policy, ``ref`` the frozen
reference, ``y_w`` / ``y_l`` the chosen / rejected completion, and

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import LmforgeError

__all__ = ["bradley_terry_loss", "dpo_loss", "orpo_loss", "orpo_nll", "preference_metrics", "rpo_loss"]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation losses, one per pair.

    - ``"sigmoid"`` (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7):
      ``L = -log sigma(beta * h)``. With ``label_smoothing = eps > 0`` this is
      conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy preferences"),
      which assumes each label is flipped with probability ``eps``:
      ``L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``.
    - ``"ipo"`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
      from Human Preferences", Eq. 17, with ``tau = beta``):
      ``L = (h - 1 / (2 beta))^2``. Following TRL (and the IPO authors), the log-ratios
      are averaged per completion token when ``chosen_lengths`` / ``rejected_lengths``
      are given: ``h = (log-ratio_w / |y_w|) - (log-ratio_l / |y_l|)``. Without lengths
      the inputs are used as given (pass length-averaged log-probs, or sums for the
      paper's literal sequence-level form).
    - ``"hinge"`` (SLiC; Zhao et al. 2023, "SLiC-HF", Eq. 3 with margin ``1/beta``):
      ``L = max(0, 1 - beta * h)``.

    Rewards are the implicit DPO rewards ``r = beta * (log pi(y|x) - log ref(y|x))``,
    detached (for logging and :func:`preference_metrics`).

    Args:
        policy_chosen_logps: ``(B,)`` summed log-probs of the chosen completions under pi.
        policy_rejected_logps: ``(B,)`` same for the rejected completions.
        ref_chosen_logps: ``(B,)`` chosen completions under the reference.
        ref_rejected_logps: ``(B,)`` rejected completions under the reference.
        beta: inverse temperature (``tau`` in IPO).
        loss_type: ``"sigmoid"``, ``"ipo"`` or ``"hinge"``.
        label_smoothing: cDPO flip probability in ``[0, 0.5)``; sigmoid only.
        chosen_lengths: ``(B,)`` scored tokens per chosen completion (IPO only).
        rejected_lengths: ``(B,)`` scored tokens per rejected completion (IPO only).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise LmforgeError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise LmforgeError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0.0 and loss_type != "sigmoid":
        raise LmforgeError(f"label_smoothing applies to loss_type='sigmoid' (cDPO) only, not {loss_type!r}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)

    if loss_type == "sigmoid":
        z = beta * (chosen_logratios - rejected_logratios)  # (B,)
        losses = -(1.0 - label_smoothing) * F.logsigmoid(z)
        if label_smoothing > 0.0:
            losses = losses - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * (chosen_logratios - rejected_logratios))
    else:  # ipo
        if chosen_lengths is not None:
            h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        else:
            h = chosen_logratios - rejected_logratios
        losses = (h - 1.0 / (2.0 * beta)) ** 2

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable everywhere (Maechler 2012).

    Uses ``log(-expm1(x))`` for ``x > -log 2`` and ``log1p(-exp(x))`` below; each
    branch sees an input clamped to its own region so neither yields inf/NaN gradients.
    """
    cut = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near_zero, far)


def orpo_loss(
    chosen_logps_mean: Tensor, rejected_logps_mean: Tensor, *, beta: float = 0.1
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, "ORPO: Monolithic Preference Optimization
    without Reference Model", Eqs. 4-7).

    With length-averaged log-probs ``l = (1/|y|) sum_t log P(y_t | x, y_<t)`` and
    ``odds(y|x) = P / (1 - P)``, ``P = exp(l)``:

        log odds(y|x) = l - log(1 - exp(l))
        log OR        = log odds(y_w|x) - log odds(y_l|x)
        L_OR          = -log sigma(log OR)

    The full ORPO objective is ``L_SFT + beta * L_OR`` (``beta`` is the paper's
    ``lambda``); this function returns ``beta * L_OR`` and the caller adds the NLL of
    the chosen completion. TRL's ``ORPOTrainer.odds_ratio_loss`` returns the negation
    (``beta * log sigma(log OR)``) and subtracts it.

    Args:
        chosen_logps_mean: ``(B,)`` length-averaged log-probs of the chosen completions (< 0).
        rejected_logps_mean: ``(B,)`` same for the rejected completions.
        beta: weight of the odds-ratio term (``lambda``).

    Returns:
        ``(or_losses, chosen_rewards, rejected_rewards, log_odds_ratio)``, each ``(B,)``;
        rewards are ``beta * l`` and ``log_odds_ratio`` is ``log OR``, all three detached.
    """
    chosen = chosen_logps_mean.float()  # (B,)
    rejected = rejected_logps_mean.float()  # (B,)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))  # (B,)
    or_losses = -beta * F.logsigmoid(log_odds)
    return or_losses, beta * chosen.detach(), beta * rejected.detach(), log_odds.detach()


def orpo_nll(chosen_logps_sum: Tensor, chosen_counts: Tensor) -> Tensor:
    """ORPO's SFT term ``L_SFT`` as TRL's ``ORPOTrainer`` computes it: the mean negative
    log-likelihood over every scored token of the batch's chosen sequences (tokens pooled across
    the batch, as ``nn.CrossEntropyLoss`` does), spread over the pairs:

        nll_i = -S_i * B / N,   S_i = sum_t log P(y_i,t | ...),   N = sum_j n_j

    so that ``mean_i(nll_i) = -(sum_i S_i) / N`` (the pooled token mean; a long chosen reply
    weighs more than a short one, unlike a mean of per-sequence means).

    Args:
        chosen_logps_sum: ``(B,)`` summed log-probs of the scored tokens of each chosen sequence.
        chosen_counts: ``(B,)`` number of scored tokens of each.

    Returns:
        ``(B,)`` per-pair NLL terms whose mean is the pooled token-mean NLL.
    """
    total = chosen_counts.sum().clamp(min=1).to(chosen_logps_sum.dtype)
    return -chosen_logps_sum.float() * chosen_logps_sum.shape[0] / total


def rpo_loss(
    dpo_losses: Tensor, chosen_logps_sum: Tensor, chosen_counts: Tensor, *, alpha: float
) -> tuple[Tensor, Tensor]:
    """RPO: the DPO losses plus ``alpha`` times the NLL of the chosen reply under the policy
    (Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 3; the reference stays
    the model DPO starts from):

        L_i   = L_DPO,i + alpha * nll_i
        nll_i = -S_i * B / N,   S_i = sum_t log pi(y_w,i,t | x_i, y_w,i,<t),   N = sum_j n_j

    so that ``mean_i(L_i) = mean_i(L_DPO,i) - alpha * (sum_i S_i) / N``: the NLL is the token mean
    over every scored (response) token of the batch's chosen replies, pooled across the batch, as
    TRL computes it (``DPOConfig.rpo_alpha`` before TRL 1.0: ``F.cross_entropy`` over the chosen
    labels; TRL 1.x: ``loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]``, whose ``"sft"`` term
    is ``-chosen_per_token_logps[chosen_mask].mean()``). The paper divides each sequence's
    log-likelihood by its own length (prompt and reply) instead; the pooled mean weighs a long chosen
    reply more than a short one. ``alpha = 0`` returns ``dpo_losses`` unchanged.

    Args:
        dpo_losses: ``(B,)`` per-pair DPO losses (:func:`dpo_loss`).
        chosen_logps_sum: ``(B,)`` summed policy log-probs of each chosen reply's scored tokens.
        chosen_counts: ``(B,)`` number of scored tokens of each chosen reply.
        alpha: weight of the NLL term (``>= 0``).

    Returns:
        ``(losses, nll)``, each ``(B,)``; ``nll`` (detached) is the per-pair NLL term, whose mean
        is the pooled token-mean NLL of the batch's chosen replies.
    """
    if alpha < 0:
        raise LmforgeError(f"rpo_alpha must be >= 0, got {alpha}")
    nll = orpo_nll(chosen_logps_sum, chosen_counts)  # (B,) same pooled token mean as ORPO's SFT term
    if alpha == 0:
        return dpo_losses, nll.detach()
    return dpo_losses + alpha * nll, nll.detach()


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | None = None) -> Tensor:
    """Pairwise reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, Eq. 1).

    ``L = -log sigma(r(x, y_w) - r(x, y_l) - m)``, with an optional per-pair margin
    ``m`` (Llama 2, Touvron et al. 2023, Eq. 2).

    Args:
        chosen_scores: ``(B,)`` scalar rewards of the chosen completions.
        rejected_scores: ``(B,)`` scalar rewards of the rejected completions.
        margin: optional ``(B,)`` (or scalar) margin.

    Returns:
        ``(B,)`` losses.
    """
    diff = chosen_scores - rejected_scores  # (B,)
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """Summary of implicit (or reward-model) rewards over a batch.

    Args:
        chosen_rewards: ``(B,)`` rewards of the chosen completions.
        rejected_rewards: ``(B,)`` rewards of the rejected completions.

    Returns:
        ``{"accuracy": mean(r_w > r_l), "margin": mean(r_w - r_l),
        "chosen": mean(r_w), "rejected": mean(r_l)}`` as Python floats.
    """
    chosen = chosen_rewards.detach().float()
    rejected = rejected_rewards.detach().float()
    return {
        "accuracy": (chosen > rejected).float().mean().item(),
        "margin": (chosen - rejected).mean().item(),
        "chosen": chosen.mean().item(),
        "rejected": rejected.mean().item(),
    }
