"""RL losses: hand-computed values and parity with what TRL still ships."""
from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.losses.rl import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    kl_shaped_rewards,
    masked_entropy,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    token_entropy,
    value_loss,
)


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def _close(got, want, abs=1e-9):
    want = torch.tensor(want, dtype=torch.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.allclose(got.detach().double(), want, atol=abs, rtol=1e-7), (got, want)


X = _t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
M = _t([1, 1, 0], [1, 0, 0])  # masked entries: 1, 2, 4


def test_masked_mean_var_hand():
    assert masked_mean(X, M).item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
    assert masked_mean(X, M, dim=1).tolist() == pytest.approx([1.5, 4.0])
    # deviations -4/3, -1/3, 5/3 -> squares 16/9 + 1/9 + 25/9 = 14/3; unbiased / 2 = 7/3, biased / 3 = 14/9
    assert masked_var(X, M).item() == pytest.approx(7 / 3)
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(14 / 9)
    assert masked_mean(X, torch.zeros_like(M)).item() == 0.0


def test_masked_whiten_hand():
    w = masked_whiten(X, M, eps=0.0)
    # first entry: (1 - 7/3) / sqrt(7/3)
    assert w[0, 0].item() == pytest.approx((-4 / 3) / math.sqrt(7 / 3))
    assert w[1, 1].item() == 0.0 and w[0, 2].item() == 0.0  # padding stays 0
    assert masked_mean(w, M).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, M).item() == pytest.approx(1.0)
    # rescale only: the mean 7/3 is kept
    assert masked_mean(masked_whiten(X, M, shift_mean=False, eps=0.0), M).item() == pytest.approx(7 / 3)


def test_policy_loss_hand():
    # row 0: ratios 1.5, 0.5, 1.1 with A = 1, -1, 2; row 1: ratio 0.5 with A = 1, then a padded token (ratio 100)
    old = torch.zeros(2, 3, dtype=torch.float64)
    logps = torch.log(_t([1.5, 0.5, 1.1], [0.5, 100.0, 1.0])).requires_grad_(True)
    adv = _t([1.0, -1.0, 2.0], [1.0, 5.0, 5.0])
    mask = _t([1, 1, 1], [1, 0, 0])
    loss, clip_frac, approx_kl = policy_loss(logps, old, adv, mask, clip_eps=0.2)
    # t(0,0): max(-1.5, -1.2) = -1.2 clipped; t(0,1): max(0.5, 0.8) = 0.8 clipped;
    # t(0,2): -2.2 inside the range; t(1,0): max(-0.5, -0.8) = -0.5 (ratio low but A > 0: not clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2 - 0.5) / 4)
    assert clip_frac.item() == pytest.approx(2 / 4)
    logs = [math.log(1.5), math.log(0.5), math.log(1.1), math.log(0.5)]
    assert approx_kl.item() == pytest.approx(sum(0.5 * v * v for v in logs) / 4)
    loss.backward()
    # d/dlogp of -A r = -A r; clipped tokens and padding get no gradient
    _close(logps.grad, [[0.0, 0.0, -2.2 / 4], [-0.5 / 4, 0.0, 0.0]])


def test_policy_loss_clip_higher_and_sequence_advantages():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logps = torch.log(_t([1.25, 1.25]))
    # eps_high = 0.3: ratio 1.25 with A = 2 is inside [0.8, 1.3] -> -2.5 each
    loss, frac, _ = policy_loss(logps, old, _t(2.0).reshape(1), torch.ones(1, 2), clip_eps=0.2, clip_eps_high=0.3)
    assert loss.item() == pytest.approx(-2.5) and frac.item() == 0.0
    loss, frac, _ = policy_loss(logps, old, _t(2.0).reshape(1), torch.ones(1, 2), clip_eps=0.2)
    assert loss.item() == pytest.approx(-2.4) and frac.item() == 1.0  # clipped to 1.2


def test_value_loss_hand():
    values = _t([1.0, 2.0, 0.0]).requires_grad_(True)
    old = _t([0.5, 2.0, 0.0])
    returns = _t([2.0, 1.0, 7.0])
    mask = _t([1, 1, 0])
    loss, frac = value_loss(values, old, returns, mask, clip_range=0.2)
    # t0: V = 1 -> err 1; clipped V = 0.5 + 0.2 = 0.7 -> err 1.69 (larger); t1: both 1; t2 padding
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert frac.item() == pytest.approx(0.5)
    loss.backward()
    # t0's max is the clipped term (clamped: no gradient); t1: 0.5 * 2 * (V - R) / 2 = 0.5
    _close(values.grad, [[0.0, 0.5, 0.0]])
    plain, _ = value_loss(values, old, returns, mask, clip_range=None)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)


def test_gae_hand():
    rewards = _t([0.0, 0.0, 1.0, 5.0])
    values = _t([0.5, 0.6, 0.7, 9.0])  # last position is padding
    mask = _t([1, 1, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t2: delta = 1 - 0.7 = 0.3 (episode ends)                 A2 = 0.3
    # t1: delta = 0.9 * 0.7 - 0.6 = 0.03;  A1 = 0.03 + 0.45 * 0.3 = 0.165
    # t0: delta = 0.9 * 0.6 - 0.5 = 0.04;  A0 = 0.04 + 0.45 * 0.165 = 0.11425
    _close(adv, [[0.11425, 0.165, 0.3, 0.0]])
    _close(ret, [[0.61425, 0.765, 1.0, 0.0]])
    # gamma = lambda = 1: Monte-Carlo return minus the value
    adv1, ret1 = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    _close(adv1, [[0.5, 0.4, 0.3, 0.0]])
    _close(ret1, [[1.0, 1.0, 1.0, 0.0]])


def test_kl_estimators_hand():
    logps = _t([-1.0, -2.0, -3.0])
    ref = _t([-1.5, -1.5, 0.0])  # d = 0.5, -0.5, padding
    mask = _t([1, 1, 0])
    _close(kl_penalty(logps, ref, mask, estimator="k1"), [[0.5, -0.5, 0.0]])
    _close(kl_penalty(logps, ref, mask, estimator="k2"), [[0.125, 0.125, 0.0]])
    # k3 = exp(-d) - 1 + d: exp(-0.5) - 0.5 = 0.106531, exp(0.5) - 1.5 = 0.148721
    k3 = kl_penalty(logps, ref, mask, estimator="k3")
    _close(k3, [[math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5, 0.0]])
    # TRL's GRPOTrainer computes its per-token KL inline as exp(ref - logp) - (ref - logp) - 1
    assert torch.allclose(k3[:, :2], (torch.exp(ref - logps) - (ref - logps) - 1)[:, :2])
    with pytest.raises(LmforgeError, match="estimator"):
        kl_penalty(logps, ref, estimator="k4")


def test_kl_estimators_unbiased_on_samples():
    # E_{x~p}[k1] = E_{x~p}[k3] = KL(p || q) for two categoricals; k2 is biased upward here
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()
    lp, lq = p.log(), q.log()
    for est in ("k1", "k3"):
        expect = (p * kl_penalty(lp, lq, estimator=est)).sum().item()
        assert expect == pytest.approx(exact)
    assert (p * kl_penalty(lp, lq, estimator="k2")).sum().item() > exact


def test_kl_shaped_rewards_hand():
    kl = _t([0.1, 0.2, 0.3], [0.5, 9.0, 9.0])
    mask = _t([1, 1, 1], [1, 0, 0])
    r = kl_shaped_rewards(_t(2.0, 3.0).reshape(2), kl, mask, kl_coef=0.1)
    _close(r, [[-0.01, -0.02, -0.03 + 2.0], [-0.05 + 3.0, 0.0, 0.0]])
    empty = kl_shaped_rewards(_t(2.0).reshape(1), _t([0.1, 0.2]), _t([0, 0]), kl_coef=0.1)
    assert empty.tolist() == [[0.0, 0.0]]


def test_kl_controllers_hand():
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 9 -> error 0.5 clipped to 0.2: beta = 0.2 * (1 + 0.2 * 256 / 10000) = 0.201024
    assert ctl.update(9.0, 256) == pytest.approx(0.201024)
    # KL 3 -> error -0.5 clipped to -0.2
    assert ctl.update(3.0, 256) == pytest.approx(0.201024 * (1 - 0.00512))
    # KL 6.6 -> error 0.1 inside the clip
    before = ctl.value
    assert ctl.update(6.6, 1000) == pytest.approx(before * (1 + 0.1 * 1000 / 10000))
    again = AdaptiveKLController(1.0, target=1.0, horizon=1)
    again.load_state_dict(ctl.state_dict())
    assert again == ctl
    with pytest.raises(LmforgeError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_entropy_hand():
    # [0, 0] -> ln 2; [0, ln 3] -> p = (1/4, 3/4), H = -(1/4 ln 1/4 + 3/4 ln 3/4); padding row uniform over 2 ignored
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [5.0, -5.0]]], dtype=torch.float64)
    h3 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    _close(token_entropy(logits), [[math.log(2), h3, token_entropy(logits)[0, 2].item()]])
    assert masked_entropy(logits, _t([1, 1, 0])).item() == pytest.approx((math.log(2) + h3) / 2)


def test_entropy_parity_trl():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    assert torch.allclose(token_entropy(logits), trl_utils.entropy_from_logits(logits), atol=1e-5)


def test_explained_variance_hand():
    ret = _t([1.0, 2.0, 3.0, 50.0])
    mask = _t([1, 1, 1, 0])
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(_t([2.0, 2.0, 2.0, 0.0]), ret, mask).item() == pytest.approx(0.0)
    # V = R + (1, -1, 0): Var[R - V] = Var(-1, 1, 0) = 1, Var[R] = 1 -> 0
    assert explained_variance(ret + _t([1.0, -1.0, 0.0, 0.0]), ret, mask).item() == pytest.approx(0.0)


def test_rloo_hand():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    # group 1 baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5; group 2: 1.5, 1.5, 0
    assert rloo_advantages(r, 3).tolist() == pytest.approx([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])


def test_grpo_hand():
    r = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0], dtype=torch.float64)
    # group 1: mean 3, unbiased var (4 + 1 + 9) / 2 = 7; group 2 constant -> 0 / (0 + eps) = 0
    s = math.sqrt(7.0) + 1e-4
    assert grpo_advantages(r, 3).tolist() == pytest.approx([-2 / s, -1 / s, 3 / s, 0.0, 0.0, 0.0])
    assert grpo_advantages(r, 3, scale=False).tolist() == pytest.approx([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0])


def test_group_baselines_parity_trl():
    """TRL's GRPO/RLOO advantages are inline in ``_generate_and_score_completions`` (no standalone
    function); its std convention is ``trl.trainer.utils.nanstd`` with ``eps = 1e-4``."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    g = torch.Generator().manual_seed(1)
    r = torch.randn(4 * 5, generator=g, dtype=torch.float64)
    grouped = r.view(-1, 5)
    std = trl_utils.nanstd(grouped, dim=1).repeat_interleave(5)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(5)
    assert torch.allclose(grpo_advantages(r, 5), (r - mean) / (std + 1e-4))
    # RLOO leave-one-out == k/(k-1) * (r - group mean)
    assert torch.allclose(rloo_advantages(r, 5), 5 / 4 * (r - mean))


def test_group_errors():
    with pytest.raises(LmforgeError, match="k >= 2"):
        grpo_advantages(torch.ones(4), 1)
    with pytest.raises(LmforgeError, match="whole number"):
        rloo_advantages(torch.ones(5), 2)
    with pytest.raises(LmforgeError, match="shape"):
        rloo_advantages(torch.ones(2, 2), 2)
    with pytest.raises(LmforgeError, match="clip range"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), clip_eps=0.0)
