"""Reinforcement-learning losses: PPO (policy, value, GAE, KL penalty), RLOO and GRPO baselines.

All functions are pure: they take per-token log-probabilities, values and rewards of a batch of
sampled responses and return losses / advantages; nothing here generates, scores or steps.
Notation: ``B`` responses of at most ``T`` tokens, right-padded; ``mask`` is ``(B, T)`` with 1 on
response tokens (contiguous from position 0) and 0 on padding. ``logps`` are the current policy's
log-probs of the sampled tokens, ``old_logps`` those of the policy that sampled them (detached),
``ref_logps`` those of the frozen reference, and

    r_t = exp(logps_t - old_logps_t)                          (probability ratio)

Masked reductions average over response tokens of the whole batch (token-level mean, as PPO in
Ziegler et al. 2019 and Ouyang et al. 2022). :func:`masked_mean` returns 0 on an empty mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.losses.kl_control import AdaptiveKLController, FixedKLController  # re-exported

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "explained_variance",
    "gae",
    "grpo_advantages",
    "kl_penalty",
    "kl_shaped_rewards",
    "masked_entropy",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "rloo_advantages",
    "token_entropy",
    "value_loss",
]

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(x * m) / sum(m)`` over ``dim`` (all elements when None); 0 where ``sum(m) = 0``.

    Args:
        x: ``(B, T)`` values (or anything broadcastable with ``mask``).
        mask: ``(B, T)`` 0/1 (bool or float).
        dim: dimension to reduce, or None for a scalar.
    """
    m = mask.to(x.dtype)
    x = x.expand_as(m) if x.shape != m.shape else x
    num = (x * m).sum() if dim is None else (x * m).sum(dim)
    den = m.sum() if dim is None else m.sum(dim)
    return num / den.clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries: ``sum m (x - mu)^2 / (n - 1)`` (``/ n`` when not unbiased),
    ``mu = masked_mean(x, mask)``, ``n = sum(m)``. Scalar; 0 when ``n <= 1`` and unbiased."""
    mu = masked_mean(x, mask)
    m = mask.to(x.dtype)
    n = m.sum()
    ss = (((x - mu) ** 2) * m).sum()
    if unbiased:
        return torch.where(n > 1, ss / (n - 1).clamp(min=1.0), torch.zeros_like(ss))
    return ss / n.clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Advantage whitening over the masked entries of the whole batch:

        x' = (x - mu) / sqrt(var + eps)            (shift_mean=True)
        x' = (x - mu) / sqrt(var + eps) + mu       (shift_mean=False: rescale only)

    with ``mu``, ``var`` the masked mean and unbiased variance (:func:`masked_var`). Padding
    positions come back as 0.

    Args:
        x: ``(B, T)`` advantages.
        mask: ``(B, T)`` response mask.

    Returns:
        ``(B, T)``.
    """
    mu = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mu
    return out * mask.to(x.dtype)


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
    Eq. 7), as a loss to minimise:

        L_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))
        L   = masked_mean(L_t)

    ``eps_high`` defaults to ``eps_low = clip_eps`` (DAPO's "clip-higher" when larger).

    Also returns the clip fraction ``masked_mean[-A clip(r) > -A r]`` (share of tokens whose
    gradient the clip removed) and the approximate KL between the sampling and the current policy,
    ``masked_mean[0.5 (logps - old_logps)^2]`` (Schulman's k2 estimator, as in OpenAI's
    lm-human-preferences and TRL's former PPO trainer), both detached.

    Args:
        logps: ``(B, T)`` log-probs of the sampled tokens under the current policy (with grad).
        old_logps: ``(B, T)`` same under the sampling policy (no grad).
        advantages: ``(B, T)`` per-token advantages, or ``(B,)`` / ``(B, 1)`` per sequence.
        mask: ``(B, T)`` response mask.
        clip_eps: lower clip range ``eps_low`` (and upper when ``clip_eps_high`` is None).
        clip_eps_high: upper clip range.

    Returns:
        ``(loss, clip_fraction, approx_kl)``, scalars.
    """
    if clip_eps <= 0 or (clip_eps_high is not None and clip_eps_high <= 0):
        raise LmforgeError(f"clip range must be > 0, got {clip_eps} / {clip_eps_high}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1)
    log_ratio = logps - old_logps.detach()  # (B, T)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    clip_fraction = masked_mean((pg2 > pg1).to(logps.dtype), mask).detach()
    approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_range: float | None = 0.2
) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss (OpenAI baselines ``ppo2``; Ziegler et al. 2019):

        V^clip_t = old_V_t + clip(V_t - old_V_t, -c, c)
        L        = 0.5 * masked_mean(max((V_t - R_t)^2, (V^clip_t - R_t)^2))

    With ``clip_range=None`` it is the plain ``0.5 * masked_mean((V_t - R_t)^2)``.

    Args:
        values: ``(B, T)`` current value predictions (with grad).
        old_values: ``(B, T)`` predictions at rollout time (no grad).
        returns: ``(B, T)`` targets ``R_t`` (e.g. from :func:`gae`).
        mask: ``(B, T)`` response mask.
        clip_range: ``c``.

    Returns:
        ``(loss, clip_fraction)``; the fraction of tokens where the clipped term was larger.
    """
    returns = returns.detach()
    err = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(err, mask), torch.zeros((), dtype=values.dtype, device=values.device)
    old_values = old_values.detach()
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    frac = masked_mean((err_clipped > err).to(values.dtype), mask).detach()
    return loss, frac


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eqs. 11-16) over right-padded responses:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                        (value targets)

    where ``V_{t+1}`` and ``A_{t+1}`` are 0 past the last response token (the episode ends there;
    padding values are ignored). Padding positions of the outputs are 0.

    Args:
        rewards: ``(B, T)`` per-token rewards (see :func:`kl_shaped_rewards`).
        values: ``(B, T)`` value predictions at rollout time.
        mask: ``(B, T)`` response mask, right-padded.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, each ``(B, T)``.
    """
    m = mask.to(rewards.dtype)
    values = values * m
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])  # A_{t+1}, (B,)
    for t in reversed(range(T)):
        next_m = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v * next_m - values[:, t]
        last = (delta + gamma * lam * next_m * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


def kl_penalty(logps: Tensor, ref_logps: Tensor, mask: Tensor | None = None, *, estimator: str = "k1") -> Tensor:
    """Per-token estimate of ``KL(pi || ref)`` from tokens sampled from ``pi`` (Schulman 2020,
    "Approximating KL divergence"), with ``d_t = logps_t - ref_logps_t``:

        k1 = d                       unbiased, can be negative (used in the PPO reward, Ziegler 2019)
        k2 = 0.5 d^2                 biased, >= 0
        k3 = exp(-d) - 1 + d         unbiased, >= 0 (GRPO's KL term, Shao et al. 2024, Eq. 4)

    Args:
        logps: ``(B, T)`` policy log-probs of the sampled tokens.
        ref_logps: ``(B, T)`` reference log-probs of the same tokens.
        mask: optional ``(B, T)`` response mask; padding comes back as 0.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``(B, T)`` per-token KL estimates.
    """
    if estimator not in KL_ESTIMATORS:
        raise LmforgeError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")
    d = logps - ref_logps
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d**2
    else:
        kl = torch.expm1(-d) + d
    return kl if mask is None else kl * mask.to(kl.dtype)


@torch.no_grad()
def kl_shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, *, kl_coef: float) -> Tensor:
    """Per-token PPO reward (Ziegler et al. 2019, Eq. 2; Stiennon et al. 2020, Eq. 1):

        r_t = -beta * KL_t + [t = last response token] * score

    Args:
        scores: ``(B,)`` sequence rewards from the reward model/function.
        kl: ``(B, T)`` per-token KL estimates (:func:`kl_penalty`).
        mask: ``(B, T)`` response mask, right-padded; a response with no token gets no score.
        kl_coef: ``beta``.

    Returns:
        ``(B, T)`` rewards, 0 on padding.
    """
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    lengths = m.sum(1).long()  # (B,)
    has = lengths > 0
    rows = torch.arange(kl.shape[0], device=kl.device)[has]
    rewards[rows, lengths[has] - 1] += scores.to(kl.dtype)[has]
    return rewards


def token_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of each position's next-token distribution:
    ``H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v``, ``p = softmax(z)``, computed in
    fp32 (fp64 stays fp64).

    Args:
        logits: ``(..., V)``.

    Returns:
        ``(...)``.
    """
    z = logits if logits.dtype == torch.float64 else logits.float()
    logp = F.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy over response tokens: ``masked_mean(token_entropy(logits), mask)``; the
    entropy bonus subtracts ``c_ent`` times this from the loss.

    Args:
        logits: ``(B, T, V)`` logits aligned with the response tokens.
        mask: ``(B, T)`` response mask.

    Returns:
        scalar.
    """
    return masked_mean(token_entropy(logits), mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over response tokens (1 = perfect value head, 0 = predicts the
    mean, < 0 = worse); NaN when ``Var[R] = 0``. Scalar, detached."""
    values, returns = values.detach(), returns.detach()
    var_r = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_r


def _grouped(rewards: Tensor, k: int) -> Tensor:
    if rewards.dim() != 1:
        raise LmforgeError(f"group baselines take (N * k,) sequence rewards, got shape {tuple(rewards.shape)}")
    if k < 2:
        raise LmforgeError(f"group baselines need k >= 2 generations per prompt, got {k}")
    if rewards.numel() % k:
        raise LmforgeError(f"{rewards.numel()} rewards are not a whole number of groups of k={k}")
    return rewards.view(-1, k)  # (N, k)


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, Eq. 4): each of the ``k``
    generations of a prompt is baselined by the mean of its ``k - 1`` siblings,

        A_i = r_i - (1 / (k - 1)) * sum_{j != i} r_j  =  k / (k - 1) * (r_i - mean(r)).

    Args:
        rewards: ``(N * k,)`` sequence rewards, prompt-major (generations of a prompt adjacent,
            the order of ``repeat_interleave``).
        k: generations per prompt (>= 2).

    Returns:
        ``(N * k,)`` advantages.
    """
    g = _grouped(rewards, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    return (g - baseline).reshape(-1)


def grpo_advantages(rewards: Tensor, k: int, *, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024, "DeepSeekMath", Sec. 4.1.2):

        A_i = (r_i - mean(r)) / (std(r) + eps)      over the k generations of a prompt

    ``std`` is the unbiased (Bessel-corrected) standard deviation, as TRL's ``GRPOTrainer``
    computes it (``trl.trainer.utils.nanstd``; ``eps = 1e-4`` there too). ``scale=False`` drops the
    division (Dr. GRPO, Liu et al. 2025).

    Args:
        rewards: ``(N * k,)`` sequence rewards, prompt-major.
        k: generations per prompt (>= 2).
        eps: added to the std.
        scale: divide by the group std.

    Returns:
        ``(N * k,)`` advantages.
    """
    g = _grouped(rewards, k)
    adv = g - g.mean(1, keepdim=True)
    if scale:
        adv = adv / (g.std(1, keepdim=True, unbiased=True) + eps)
    return adv.reshape(-1)
