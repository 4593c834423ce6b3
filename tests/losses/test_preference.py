"""Preference losses: hand-computed values and parity with TRL."""
from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.losses.lm import sequence_logps, shift_labels
from lmforge.losses.preference import bradley_terry_loss, dpo_loss, orpo_loss, preference_metrics

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -log sigmoid(-x)


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# policy chosen/rejected, reference chosen/rejected: chosen log-ratio +1, rejected -1, h = 2
PC, PR, RC, RR = _t(-10.0), _t(-12.0), _t(-11.0), _t(-11.0)


def test_dpo_sigmoid_hand():
    losses, cr, rr = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert losses.item() == pytest.approx(_softplus(-0.2), abs=1e-12)  # -log sigma(0.1 * 2)
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)


def test_cdpo_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    want = 0.9 * _softplus(-0.2) + 0.1 * _softplus(0.2)
    assert losses.item() == pytest.approx(want, abs=1e-12)


def test_dpo_hinge_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")
    assert losses.item() == pytest.approx(0.8, abs=1e-12)  # max(0, 1 - 0.2)
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=1.0, loss_type="hinge")
    assert losses.item() == 0.0  # max(0, 1 - 2)


def test_dpo_ipo_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    assert losses.item() == pytest.approx((2.0 - 5.0) ** 2, abs=1e-12)  # (h - 1/(2 beta))^2
    # per-token averaging: chosen log-ratio 1 over 4 tokens, rejected -1 over 2 tokens
    losses, _, _ = dpo_loss(
        PC, PR, RC, RR, beta=0.1, loss_type="ipo", chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([2])
    )
    assert losses.item() == pytest.approx((0.25 + 0.5 - 5.0) ** 2, abs=1e-12)


def test_dpo_rewards_detached_loss_differentiable():
    pc = PC.clone().requires_grad_()
    losses, cr, rr = dpo_loss(pc, PR, RC, RR, beta=0.1)
    assert not cr.requires_grad and not rr.requires_grad
    (g,) = torch.autograd.grad(losses.sum(), pc)
    assert g.item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.2))), abs=1e-12)  # -beta * sigma(-beta h)


def test_dpo_bad_options():
    with pytest.raises(LmforgeError):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(LmforgeError):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(LmforgeError):
        dpo_loss(PC, PR, RC, RR, label_smoothing=0.5)


def test_orpo_hand():
    # chosen mean prob 0.5 -> odds 1; rejected 0.2 -> odds 0.25; log OR = log 4
    losses, cr, rr, log_or = orpo_loss(_t(math.log(0.5)), _t(math.log(0.2)), beta=0.1)
    assert log_or.item() == pytest.approx(math.log(4.0), abs=1e-6)
    assert losses.item() == pytest.approx(0.1 * math.log(1.25), abs=1e-7)  # -0.1 log sigma(log 4) = 0.1 log(1 + 1/4)
    assert cr.item() == pytest.approx(0.1 * math.log(0.5), abs=1e-7)
    assert rr.item() == pytest.approx(0.1 * math.log(0.2), abs=1e-7)


def test_orpo_stable_at_extremes():
    chosen = torch.tensor([-1e-6, -60.0, -0.6931, -0.6932], requires_grad=True)
    rejected = torch.tensor([-80.0, -1e-7, -0.6932, -0.6931])
    losses, _, _, log_or = orpo_loss(chosen, rejected, beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()
    # chosen log odds at l = -1e-6: l - log(1 - e^l) ~ -log(1e-6); rejected at -80: ~ -80
    assert log_or[0].item() == pytest.approx(-1e-6 - math.log(-math.expm1(-1e-6)) + 80.0, rel=1e-4)


def test_bradley_terry_hand():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])
    torch.testing.assert_close(bradley_terry_loss(c, r), torch.tensor([_softplus(-1.0), _softplus(3.0)]))
    torch.testing.assert_close(
        bradley_terry_loss(c, r, margin=torch.tensor([0.5, 1.0])), torch.tensor([_softplus(-0.5), _softplus(4.0)])
    )


def test_preference_metrics_hand():
    m = preference_metrics(torch.tensor([1.0, 0.0, 2.0, -1.0]), torch.tensor([0.0, 0.5, 1.0, -1.0]))
    assert m == pytest.approx({"accuracy": 0.5, "margin": 0.375, "chosen": 0.5, "rejected": 0.125})


# ---------------------------------------------------------------- TRL parity

def _random_logps(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g) * 40 + 5) for _ in range(4)]


@pytest.mark.parametrize(
    "loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("hinge", 0.0), ("ipo", 0.0)]
)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl_on_random_logps(loss_type, label_smoothing, beta):
    """TRL 1.x keeps the cDPO/hinge/IPO formulas on raw log-probs in ``CPOTrainer.cpo_loss``:
    fed the DPO log-ratios it computes exactly DPO's loss."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    pc, pr, rc, rr = _random_logps()
    trl_self = types.SimpleNamespace(
        alpha=0.0,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )
    want, _, _ = CPOTrainer.cpo_loss(trl_self, pc - rc, pr - rr)
    got, cr, rr_ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cr, beta * (pc - rc), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rr_, beta * (pr - rr), rtol=1e-6, atol=1e-6)


def _tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def _dpo_batch(B=3, T=10, seed=1, starts=(3, 4, 2, 5, 3, 4)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2 * B, T), generator=g)  # rows: B chosen, then B rejected
    attn = torch.ones_like(ids)
    attn[1, -2:] = 0
    attn[B + 1, -3:] = 0
    completion = torch.zeros_like(ids)
    for i, start in enumerate(starts[: 2 * B]):
        completion[i, start:] = 1
    completion *= attn
    ref = -(torch.rand(2 * B, generator=g) * 10 + 20)
    return ids, attn, completion, ref


def _trl_dpo_loss(model, inputs, loss_type, beta):
    """Run TRL's ``DPOTrainer._compute_loss`` with the attributes it reads (precomputed reference logps)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    trl_self = types.SimpleNamespace(
        model=model,
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t, unwrap_model=lambda m: m
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=None,
    )
    loss = DPOTrainer._compute_loss(trl_self, model, dict(inputs), False)
    return loss, trl_self._metrics["eval"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_matches_trl_dpo_trainer_end_to_end(loss_type):
    """Same tiny model and batch: TRL's DPOTrainer loss vs sequence_logps + dpo_loss
    (checks the label shift, the masking and IPO's per-token averaging too)."""
    model = _tiny_causal_lm()
    ids, attn, completion, ref = _dpo_batch()
    B = ids.shape[0] // 2
    inputs = {
        "input_ids": ids,
        "attention_mask": attn,
        "completion_mask": completion,
        "ref_chosen_logps": ref[:B],
        "ref_rejected_logps": ref[B:],
    }
    beta = 0.1
    with torch.no_grad():
        want, metrics = _trl_dpo_loss(model, inputs, loss_type, beta)
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (2B, T, H)
        unshifted = ids.masked_fill(completion == 0, -100)
        logps, counts = sequence_logps(hidden, model.lm_head.weight, shift_labels(unshifted), return_counts=True)
        trl_logps = model(input_ids=ids, attention_mask=attn, labels=unshifted, fused_lm_head=True)
    torch.testing.assert_close(logps, trl_logps.log_probs.sum(1), rtol=1e-6, atol=1e-5)
    lengths = {"chosen_lengths": counts[:B], "rejected_lengths": counts[B:]} if loss_type == "ipo" else {}
    losses, cr, rr = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=beta, loss_type=loss_type, **lengths)
    torch.testing.assert_close(losses.mean(), want, rtol=1e-6, atol=1e-6)
    m = preference_metrics(cr, rr)
    assert m["chosen"] == pytest.approx(metrics["rewards/chosen"][0], abs=1e-6)
    assert m["rejected"] == pytest.approx(metrics["rewards/rejected"][0], abs=1e-6)
    assert m["accuracy"] == pytest.approx(metrics["rewards/accuracies"][0], abs=1e-6)
    assert m["margin"] == pytest.approx(metrics["rewards/margins"][0], abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_matches_trl(beta):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(3)
    chosen = -torch.rand(32, generator=g) * 4  # length-averaged log-probs, some near 0
    rejected = -torch.rand(32, generator=g) * 4
    chosen[0], rejected[1] = -1e-4, -1e-5
    trl_self = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_cr, trl_rr, trl_mean_ratio, trl_mean_log_odds = ORPOTrainer.odds_ratio_loss(
        trl_self, chosen, rejected
    )
    losses, cr, rr, log_or = orpo_loss(chosen, rejected, beta=beta)
    torch.testing.assert_close(losses, -trl_losses, rtol=1e-6, atol=1e-6)  # TRL returns beta * log sigma
    torch.testing.assert_close(cr, trl_cr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rr, trl_rr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log_or.mean(), trl_mean_log_odds, rtol=1e-6, atol=1e-6)
