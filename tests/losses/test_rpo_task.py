"""``preference.rpo_alpha`` in the preference task: DPO + alpha x the pooled NLL of the chosen replies,
logged as ``nll``; null or 0 is plain DPO bit for bit; refused with ORPO (which has its own NLL term)."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import WORDS, write_jsonl
from lmforge.config import build_config
from lmforge.errors import LmforgeError
from lmforge.losses.preference import dpo_loss
from lmforge.tasks.preference import PreferenceTask

POS, NEG, FILL = WORDS[:6], WORDS[6:12], WORDS[12:30]


def _rows(n: int) -> list[dict]:
    rng = random.Random(0)  # chosen replies of 1-4 words: the pooled token mean differs from a mean of means
    return [{"prompt": " ".join(rng.sample(FILL, 3)), "chosen": " ".join(rng.sample(POS, rng.randint(1, 4))),
             "rejected": " ".join(rng.sample(NEG, 2))} for _ in range(n)]


def _task(tmp_path, model_dir, pref: dict, packing: bool = True) -> PreferenceTask:
    path = write_jsonl(tmp_path / "pairs.jsonl", _rows(20))
    cfg = build_config({
        "task": "preference", "name": "rpo", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(path), "eval_fraction": 0.2, "max_length": 64},
        "preference": {"beta": 0.3, "packing": packing} | pref, "lora": {"r": 8, "alpha": 16},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-2, "progress": False, "log_every": 1}})
    task = PreferenceTask(cfg)
    torch.manual_seed(5)
    with torch.no_grad():  # nonzero adapters: the policy differs from the reference
        for n, p in task.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return task


@pytest.mark.parametrize("packing", [True, False])
def test_rpo_alpha_adds_the_pooled_chosen_nll(tmp_path, tiny_llama_dir, packing):
    task = _task(tmp_path, tiny_llama_dir, {"rpo_alpha": 0.7}, packing)
    batch = task.collate(task.train_items[:5])
    got, metrics = task.loss(batch)
    logps, counts = task.sequence_logps(batch)
    ref, _ = task.reference_logps(batch)
    pc, nc = logps[:5], counts[:5]
    assert len(set(nc.tolist())) > 1
    nll = -pc.sum() / nc.sum()  # token mean over every chosen reply token of the batch
    want = dpo_loss(pc, logps[5:], ref[:5], ref[5:], beta=0.3)[0].mean() + 0.7 * nll
    assert abs(float(got.detach()) - float(want)) < 1e-5
    assert metrics["nll"] == pytest.approx(float(nll), abs=1e-5)
    assert abs(float(nll) - float((-pc / nc).mean())) > 1e-4  # not a mean of per-reply means (1e-5 tolerance above)
    got.backward()  # the term trains the adapters
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in task.model.named_parameters() if "lora" in n)


def test_rpo_alpha_null_or_zero_is_plain_dpo(tmp_path, tiny_llama_dir):
    losses = []
    for pref in ({}, {"rpo_alpha": None}, {"rpo_alpha": 0.0}):
        task = _task(tmp_path, tiny_llama_dir, pref)
        loss, metrics = task.loss(task.collate(task.train_items[:4]))
        assert "nll" not in metrics
        losses.append(loss)
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])


def test_rpo_alpha_refused_with_orpo_and_below_zero(tmp_path, tiny_llama_dir):
    with pytest.raises(LmforgeError, match="rpo_alpha"):
        _task(tmp_path, tiny_llama_dir, {"loss": "orpo", "rpo_alpha": 1.0})
    with pytest.raises(LmforgeError, match="rpo_alpha"):
        _task(tmp_path, tiny_llama_dir, {"rpo_alpha": -1.0})
