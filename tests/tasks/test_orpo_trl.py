"""ORPO against TRL's ORPOTrainer: the full loss (SFT term + odds-ratio term) on the same tokens."""
from __future__ import annotations

import random
import warnings

import pytest
import torch
from conftest import WORDS, write_jsonl

from lmforge.config import build_config
from lmforge.data.chat import IGNORE
from lmforge.tasks.preference import PreferenceTask

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

FILL, POS, NEG = WORDS[12:30], WORDS[:6], WORDS[6:12]


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)  # replies of different lengths: pooled and per-sequence means differ
    return [{"prompt": " ".join(rng.sample(FILL, rng.randint(1, 5))),
             "chosen": " ".join(rng.sample(POS, rng.randint(1, 5))),
             "rejected": " ".join(rng.sample(NEG, rng.randint(1, 5)))} for _ in range(n)]


def _trl_loss(model_dir, rows, beta, tmp_path):
    """TRL's full ORPO loss and its tokenised features for ``rows`` (one batch)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, max_length=64, report_to=[], bf16=False,
                      use_cpu=True, per_device_train_batch_size=len(rows), remove_unused_columns=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    feats = [trainer.train_dataset[i] for i in range(len(rows))]
    batch = trainer.data_collator(feats)
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(model, batch)
        logits = model(batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits
        response_sum = ORPOTrainer.get_batch_logps(logits, batch["chosen_labels"])  # (B,) TRL's own code
    response_nll = float(-response_sum.sum() / (batch["chosen_labels"][:, 1:] != -100).sum())
    return float(loss), {k: float(v) for k, v in metrics.items()}, feats, response_nll


def _items(feats) -> list[dict]:
    """lmforge preference items holding exactly TRL's tokens (its BOS on the prompt, EOS on replies)."""
    out = []
    for f in feats:
        p = f["prompt_input_ids"]
        item = {"prompt_ids": p}
        for s in ("chosen", "rejected"):
            ids, labels = f[f"{s}_input_ids"], f[f"{s}_labels"]
            assert ids[:len(p)] == p
            item[f"{s}_ids"] = ids[len(p):]
            item[f"{s}_labels"] = [IGNORE if y == -100 else y for y in labels[len(p):]]
        out.append(item)
    return out


def _task(tmp_path, model_dir, rows, nll, packing):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = build_config({
        "task": "preference", "name": "orpo", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32", "attn_implementation": "eager"},
        "data": {"train": str(path), "eval_fraction": 0.0, "max_length": 64},
        "preference": {"loss": "orpo", "beta": 0.3, "mode": "full", "orpo_nll": nll, "packing": packing},
        "train": {"batch_size": 8, "progress": False}})
    return PreferenceTask(cfg)


@pytest.mark.parametrize("packing", [True, False])
def test_full_orpo_loss_equals_trl_orpotrainer(tmp_path, tiny_llama_dir, packing):
    rows = _rows(6)
    want, trl_metrics, feats, trl_response_nll = _trl_loss(tiny_llama_dir, rows, 0.3, tmp_path)
    items = _items(feats)

    task = _task(tmp_path, tiny_llama_dir, rows, "prompt_and_response", packing)
    with torch.no_grad():
        got, metrics = task.loss(task.collate(items))
    assert float(got) == pytest.approx(want, abs=2e-5)                    # TRL scores prompt + response
    assert metrics["nll"] == pytest.approx(trl_metrics["nll_loss"], abs=2e-5)
    assert metrics["log_odds_ratio"] == pytest.approx(trl_metrics["log_odds_chosen"], abs=2e-5)

    task = _task(tmp_path, tiny_llama_dir, rows, "response", packing)     # the paper: the response only
    with torch.no_grad():
        got_r, metrics_r = task.loss(task.collate(items))
    or_term = want - trl_metrics["nll_loss"]
    assert metrics_r["nll"] == pytest.approx(trl_response_nll, abs=2e-5)
    assert float(got_r) == pytest.approx(trl_response_nll + or_term, abs=2e-5)
    assert abs(float(got_r) - float(got)) > 1e-3                           # the option is a real difference


def test_the_nll_is_a_pooled_token_mean_not_a_mean_of_means():
    from lmforge.losses.preference import orpo_nll

    sums, counts = torch.tensor([-2.0, -12.0]), torch.tensor([1, 4])     # per-token -2 and -3
    assert float(orpo_nll(sums, counts).mean()) == pytest.approx(14 / 5)    # not (2 + 3) / 2
