"""RPO (DPO + alpha * NLL of the chosen reply): hand-computed values and parity with TRL's DPOTrainer
(``loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]``, TRL 1.x's form of the former ``rpo_alpha``)."""
from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.losses.lm import sequence_logps, shift_labels
from lmforge.losses.preference import dpo_loss, rpo_loss

from .test_preference import _dpo_batch


def test_rpo_hand():
    # two pairs: chosen replies of 1 and 3 scored tokens with summed log-probs -2 and -6 -> N = 4, B = 2
    dpo = torch.tensor([0.5, 1.0])
    sums, counts = torch.tensor([-2.0, -6.0]), torch.tensor([1, 3])
    losses, nll = rpo_loss(dpo, sums, counts, alpha=0.5)
    # nll_i = -S_i * B / N = [2 * 2 / 4, 6 * 2 / 4] = [1, 3]; mean 2 = (2 + 6) / 4, the pooled token mean
    torch.testing.assert_close(nll, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(losses, torch.tensor([0.5 + 0.5 * 1.0, 1.0 + 0.5 * 3.0]))
    assert float(losses.mean()) == pytest.approx(0.75 + 0.5 * 8 / 4)
    # not the mean of per-sequence means ((2/1 + 6/3) / 2 = 2 here too, so check a case where they differ)
    _, nll2 = rpo_loss(dpo, torch.tensor([-2.0, -3.0]), counts, alpha=1.0)
    assert float(nll2.mean()) == pytest.approx(5 / 4) and (2 / 1 + 3 / 3) / 2 != 5 / 4


def test_rpo_gradient_is_minus_alpha_over_tokens():
    dpo = torch.tensor([0.3, 0.7, 0.2])
    sums = torch.tensor([-4.0, -1.0, -9.0], requires_grad=True)
    counts = torch.tensor([2, 1, 5])
    losses, _ = rpo_loss(dpo, sums, counts, alpha=2.0)
    losses.mean().backward()
    torch.testing.assert_close(sums.grad, torch.full((3,), -2.0 / 8))  # d/dS_i of -alpha * sum(S) / N


def test_rpo_alpha_zero_is_plain_dpo_and_negative_is_refused():
    dpo = torch.tensor([0.25, 0.5])
    losses, nll = rpo_loss(dpo, torch.tensor([-1.0, -2.0]), torch.tensor([1, 1]), alpha=0.0)
    assert losses is dpo  # bit for bit: the DPO losses themselves
    torch.testing.assert_close(nll, torch.tensor([1.0, 2.0]))  # still reported
    with pytest.raises(LmforgeError, match="rpo_alpha"):
        rpo_loss(dpo, torch.tensor([-1.0, -2.0]), torch.tensor([1, 1]), alpha=-0.1)


# ---------------------------------------------------------------- TRL parity

def _tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def _batch(B=3, T=10, seed=1):
    """2B rows (B chosen, then B rejected) whose completions differ in length: pooled != per-sequence mean."""
    return _dpo_batch(B, T, seed, starts=(3, 6, 2, 5, 3, 4))


def _trl_loss(model, inputs, beta, alpha):
    """TRL's ``DPOTrainer._compute_loss`` with DPO + ``alpha`` x its "sft" term (precomputed reference logps)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    trl_self = types.SimpleNamespace(
        model=model,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t,
                                          gather_for_metrics=lambda t: t, unwrap_model=lambda m: m),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0, loss_types=["sigmoid", "sft"], loss_weights=[1.0, alpha], beta=beta,
        label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=None)
    return DPOTrainer._compute_loss(trl_self, model, dict(inputs), False)


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_rpo_matches_trl_dpo_trainer(alpha):
    pytest.importorskip("trl")
    model = _tiny_causal_lm()
    ids, attn, completion, ref = _batch()
    B = ids.shape[0] // 2
    inputs = {"input_ids": ids, "attention_mask": attn, "completion_mask": completion,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    with torch.no_grad():
        want = _trl_loss(model, inputs, 0.1, alpha)
        plain = _trl_loss(model, inputs, 0.1, 0.0)
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (2B, T, H)
        unshifted = ids.masked_fill(completion == 0, -100)
        logps, counts = sequence_logps(hidden, model.lm_head.weight, shift_labels(unshifted), return_counts=True)
    dpo, _, _ = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=0.1)
    losses, nll = rpo_loss(dpo, logps[:B], counts[:B], alpha=alpha)
    assert counts[:B].tolist() != [counts[0].item()] * B  # chosen replies of different lengths
    torch.testing.assert_close(losses.mean(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dpo.mean(), plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alpha * nll.mean(), want - plain, rtol=1e-5, atol=1e-6)  # the term itself
