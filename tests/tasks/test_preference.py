"""The preference task: one concatenated forward, the reference, the loss family, caching, bad input."""
from __future__ import annotations

import json
import logging
import random

import pytest
import torch

from conftest import WORDS, train_and_save, write_jsonl
from lmforge.config import build_config
from lmforge.data.chat import IGNORE
from lmforge.errors import LmforgeError
from lmforge.losses.preference import dpo_loss, orpo_loss
from lmforge.tasks.preference import PreferenceTask, pair_sequences
from lmforge.train import fit

POS, NEG, FILL = WORDS[:6], WORDS[6:12], WORDS[12:30]
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy",
        "logps/chosen", "logps/rejected")


def pref_rows(n: int, seed: int = 0) -> list[dict]:
    """Chosen answers use positive words, rejected ones negative words."""
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.sample(FILL, 3)), "chosen": " ".join(rng.sample(POS, 2)),
             "rejected": " ".join(rng.sample(NEG, 2))} for _ in range(n)]


def make_cfg(tmp_path, model_dir, rows, pref=None, train=None, data=None, lora=None, name="run"):
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return build_config({
        "task": "preference", "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(path), "eval_fraction": 0.2, "max_length": 64} | (data or {}),
        "preference": pref or {}, "lora": {"r": 8, "alpha": 16} | (lora or {}),
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-2, "progress": False, "log_every": 1} | (train or {}),
    })


def full_logps(model, seq: dict) -> float:
    """log p(completion | prompt) from the model's plain logits, one sequence at a time."""
    ids = torch.tensor([seq["input_ids"]])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # (T, V)
    return float(sum(logp[t, y] for t, y in enumerate(seq["targets"]) if y != IGNORE))


def perturb_lora(model, scale=0.3):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale)


@pytest.mark.parametrize("packing", [True, False])
def test_concatenated_forward_matches_separate_sequences(tmp_path, tiny_llama_dir, packing):
    task = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, pref_rows(20), pref={"packing": packing},
                                   data={"max_length": 128}))
    perturb_lora(task.model)
    items = task.train_items[:4]
    batch = task.collate(items)
    assert task.batch_units(batch) == 4
    rows = batch["input_ids"].shape[0]
    assert rows < 8 if packing else rows == 8  # packed: fewer rows than sequences
    with torch.no_grad():
        logps, counts = task.sequence_logps(batch)
    for i, it in enumerate(items):
        c, r = pair_sequences(it)
        assert abs(float(logps[i]) - full_logps(task.model, c)) < 1e-4
        assert abs(float(logps[4 + i]) - full_logps(task.model, r)) < 1e-4
        assert int(counts[i]) == len(it["chosen_ids"]) and int(counts[4 + i]) == len(it["rejected_ids"])


def test_lora_reference_is_the_base_model_with_adapters_off(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    task = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, pref_rows(20)))
    perturb_lora(task.model)
    batch = task.collate(task.train_items[:3])
    ref, _ = task.reference_logps(batch)
    pol, _ = task.sequence_logps(batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    seqs = [s for it in task.train_items[:3] for s in pair_sequences(it)]
    seqs = seqs[0::2] + seqs[1::2]  # chosen rows first, as collated
    expect = torch.tensor([full_logps(base, s) for s in seqs])
    torch.testing.assert_close(ref.double(), expect.double(), atol=1e-4, rtol=0)
    assert (pol - ref).abs().max() > 1e-3
    assert task._ref is None  # no second copy of the model


def test_dpo_family_losses_use_the_right_inputs(tmp_path, tiny_llama_dir):
    rows = pref_rows(20)
    for loss, extra in [("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.2}), ("ipo", {}), ("hinge", {}),
                        ("orpo", {})]:
        task = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, rows, pref={"loss": loss, "beta": 0.3} | extra))
        perturb_lora(task.model)
        batch = task.collate(task.train_items[:4])
        got, metrics = task.loss(batch)
        logps, counts = task.sequence_logps(batch)
        ref, _ = task.reference_logps(batch)
        pc, pr, nc, nr = logps[:4], logps[4:], counts[:4], counts[4:]
        if loss == "orpo":
            or_l, *_ = orpo_loss(pc / nc, pr / nr, beta=0.3)
            want = -pc.sum() / nc.sum() + or_l.mean()  # SFT term: token mean over the chosen replies
        else:
            lengths = {"chosen_lengths": nc, "rejected_lengths": nr} if loss == "ipo" else {}
            want = dpo_loss(pc, pr, ref[:4], ref[4:], beta=0.3, loss_type=loss, **extra, **lengths)[0].mean()
        assert abs(float(got) - float(want)) < 1e-5, loss
        assert {k for k in KEYS if k != "loss"} <= set(metrics)
    # IPO by hand on the length-averaged log-ratios
    task = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, rows, pref={"loss": "ipo", "beta": 0.5}))
    perturb_lora(task.model)
    batch = task.collate(task.train_items[:2])
    logps, counts = task.sequence_logps(batch)
    ref, _ = task.reference_logps(batch)
    h = (logps[:2] - ref[:2]) / counts[:2] - (logps[2:] - ref[2:]) / counts[2:]
    assert abs(float(task.loss(batch)[0]) - float(((h - 1.0) ** 2).mean())) < 1e-5
    with pytest.raises(LmforgeError, match="label_smoothing"):
        PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, rows, pref={"loss": "ipo", "label_smoothing": 0.1}))


def test_full_finetuning_keeps_a_frozen_reference(tmp_path, tiny_llama_dir):
    cfg = make_cfg(tmp_path, tiny_llama_dir, pref_rows(40), pref={"mode": "full"}, train={"lr": 1e-3})
    task = PreferenceTask(cfg)
    batch = task.collate(task.train_items[:4])
    before, _ = task.reference_logps(batch)
    assert task._ref is not None and not any(p.requires_grad for p in task._ref.parameters())
    cfg.run_dir.mkdir(parents=True)
    fit(task, cfg, cfg.run_dir)
    after, _ = task.reference_logps(batch)
    torch.testing.assert_close(before, after)
    pol, _ = task.sequence_logps(batch)
    assert (pol - after).abs().max() > 1e-3


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_training_raises_heldout_accuracy_and_logs_every_step(tmp_path, tiny_llama_dir, loss):
    cfg = make_cfg(tmp_path, tiny_llama_dir, pref_rows(80), pref={"loss": loss, "beta": 0.5},
                   train={"epochs": 4, "lr": 2e-2}, lora={"modules_to_save": ["norm"]})
    _train_and_check(cfg, bar=0.85)


def test_orpo_raises_heldout_accuracy_on_100_pairs(tmp_path, tiny_llama_dir):
    """100 held-out pairs (300 trained on): measured 0.94 and 1.00 for seeds 0 and 1 (chance 0.5,
    0.17-0.26 before training), so 0.85 is a real bar, not the last observed count."""
    cfg = make_cfg(tmp_path, tiny_llama_dir, pref_rows(400), pref={"loss": "orpo", "beta": 0.5},
                   data={"eval_fraction": 0.25}, train={"epochs": 4, "lr": 2e-2}, lora={"modules_to_save": ["norm"]})
    task, _ = _train_and_check(cfg, bar=0.85)
    assert len(task.eval_items) == 100


def _train_and_check(cfg, bar: float):
    task = PreferenceTask(cfg)
    before = task.evaluate()
    cfg.run_dir.mkdir(parents=True)
    after = fit(task, cfg, cfg.run_dir)
    assert after["accuracy"] >= bar and after["accuracy"] > before["accuracy"]
    assert after["mean_margin"] > before["mean_margin"]
    steps = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["split"] == "train"]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert all(set(KEYS) <= set(s) for s in steps)
    return task, after


def test_reference_cache_is_reused_and_keyed_by_data(tmp_path, tiny_llama_dir, monkeypatch):
    from lmforge.tasks import refcache

    rows = pref_rows(30)
    calls = []
    original = PreferenceTask.reference_logps

    def counting(self, batch):
        calls.append(int(batch["input_ids"].shape[0]))
        return original(self, batch)

    monkeypatch.setattr(PreferenceTask, "reference_logps", counting)
    first = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, rows, pref={"precompute_ref": True}))
    assert sum(calls) == 2 * 30  # every pair once (train + eval), chosen and rejected
    assert all("ref_chosen" in it for it in first.train_items + first.eval_items)
    files = sorted((refcache.cache_path("x").parent).glob("*.safetensors"))
    assert len(files) == 2
    calls.clear()
    second = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, rows, pref={"precompute_ref": True}))
    assert calls == []  # loaded from the disk cache
    assert [it["ref_chosen"] for it in second.train_items] == [it["ref_chosen"] for it in first.train_items]
    # cached values equal the on-the-fly reference, and the loss uses them
    batch = first.collate(first.train_items[:4])
    live, _ = original(first, batch)
    torch.testing.assert_close(batch["ref_chosen"], live[:4].float(), atol=1e-5, rtol=0)
    PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, pref_rows(30, seed=1), pref={"precompute_ref": True},
                            name="other"))
    assert len(list(refcache.cache_path("x").parent.glob("*.safetensors"))) == 4


def test_bad_input(tmp_path, tiny_llama_dir, caplog):
    rows = pref_rows(20)
    with pytest.raises(LmforgeError, match=r"line 1: missing column 'rejected'"):
        PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, [{"prompt": "a", "chosen": "b"}] * 5))
    rows[2] = {"prompt": "the plot", "chosen": "good film", "rejected": "good film"}
    rows[5] = {"prompt": "the plot", "chosen": "", "rejected": "bad"}
    rows[9] = {"prompt": " ".join(["movie"] * 100), "chosen": "good", "rejected": "bad"}
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        task = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, rows, data={"eval_fraction": 0.0}))
    assert len(task.train_items) == 18
    assert "dropped 1 of 20 samples: chosen identical to rejected (first: " in caplog.text and "line 3)" in caplog.text
    assert "dropped 1 of 20 samples: empty chosen or rejected (first: " in caplog.text and "line 6)" in caplog.text
    assert "1 of 20 prompts longer than 32 tokens kept their last 32 tokens" in caplog.text
    long = next(it for it in task.train_items if len(it["prompt_ids"]) == 32)
    assert len(long["prompt_ids"]) + len(long["chosen_ids"]) <= 64
    same = [{"prompt": "a", "chosen": "good", "rejected": "good"}] * 4
    with pytest.raises(LmforgeError, match="no train pairs left"):
        PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, same, data={"eval_fraction": 0.0}))


def test_hh_prompts_become_chat_turns(tmp_path, tiny_llama_dir):
    rows = [{"prompt": "Human: good movie\n\nAssistant: bad film\n\nHuman: the plot\n\nAssistant:",
             "chosen": "great", "rejected": "dull"}] * 4
    task = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, rows, data={"eval_fraction": 0.0, "max_length": 128},
                                   pref={"max_prompt_length": 100}))
    msgs = [{"role": "user", "content": "good movie"}, {"role": "assistant", "content": "bad film"},
            {"role": "user", "content": "the plot"}]
    text = task.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert task.train_items[0]["prompt_ids"] == task.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_eval_on_a_finished_run(tmp_path, tiny_llama_dir):
    cfg = make_cfg(tmp_path, tiny_llama_dir, pref_rows(40), train={"epochs": 2})
    task = PreferenceTask(cfg)
    final = train_and_save(task, cfg)
    back = PreferenceTask.from_run(cfg.run_dir)
    m = back.evaluate(back.read_eval_file(str(tmp_path / "run.jsonl")))
    assert m["n"] == 40 and {"accuracy", "mean_margin", "loss", "logp_accuracy"} <= set(m)
    again = back.evaluate(task.eval_items)
    assert abs(again["accuracy"] - final["accuracy"]) < 1e-9
    assert abs(again["mean_margin"] - final["mean_margin"]) < 1e-4


def test_logp_accuracy_is_the_policy_own_per_token_preference(tmp_path, tiny_llama_dir):
    task = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, pref_rows(30)))
    perturb_lora(task.model, 0.5)
    wins = 0
    with torch.no_grad():
        for it in task.eval_items:
            c, r = pair_sequences(it)
            wins += full_logps(task.model, c) / len(it["chosen_ids"]) > full_logps(task.model, r) / len(it["rejected_ids"])
    m = task.evaluate()
    assert m["logp_accuracy"] == pytest.approx(wins / len(task.eval_items))


def test_chat_message_pairs_encode_like_text_pairs(tmp_path, tiny_llama_dir):
    text = [{"prompt": "the plot", "chosen": "good film", "rejected": "bad film"}] * 4
    msgs = [{"prompt": [{"role": "user", "content": "the plot"}],
             "chosen": [{"role": "assistant", "content": "good film"}],
             "rejected": [{"role": "assistant", "content": "bad film"}]}] * 4
    a = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, text, data={"eval_fraction": 0.0}, name="text"))
    b = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, msgs, data={"eval_fraction": 0.0}, name="msgs"))
    keys = ("prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")
    assert [[it[k] for k in keys] for it in a.train_items] == [[it[k] for k in keys] for it in b.train_items]
    turns = [{"role": "user", "content": "good movie"}, {"role": "assistant", "content": "bad film"},
             {"role": "user", "content": "the plot"}]
    multi = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, [dict(msgs[0], prompt=turns)] * 4,
                                    data={"eval_fraction": 0.0, "max_length": 128}, pref={"max_prompt_length": 100},
                                    name="multi"))
    rendered = multi.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert multi.train_items[0]["prompt_ids"] == multi.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    bad = [dict(msgs[0], chosen=[{"role": "user", "content": "good"}])] * 4
    with pytest.raises(LmforgeError, match="line 1: 'chosen' as messages must be exactly one assistant message"):
        PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, bad, name="bad"))


@pytest.mark.parametrize("precompute", [False, True])
def test_one_concatenated_policy_forward_per_step(tmp_path, tiny_llama_dir, monkeypatch, precompute):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))  # keep the shared cache's entry count
    task = PreferenceTask(make_cfg(tmp_path, tiny_llama_dir, pref_rows(20), pref={"precompute_ref": precompute}))
    shapes: list[tuple[tuple, bool]] = []  # (input_ids shape, adapters on) of every decoder forward

    def record(module, args, kwargs):
        from lmforge.adapters.lora import LoraLinear

        on = not any(m.disabled for m in task.model.modules() if isinstance(m, LoraLinear))
        shapes.append((tuple(kwargs["input_ids"].shape), on))

    batch = task.collate(task.train_items[:4])  # 4 chosen + 4 rejected sequences (packed rows)
    hook = task.model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        task.loss(batch)
    finally:
        hook.remove()
    whole = tuple(batch["input_ids"].shape)
    assert [s for s, on in shapes if on] == [whole]  # one policy forward over chosen and rejected together
    # the reference: read from the cache, or one more forward of the same batch with the adapters off
    assert [s for s, on in shapes if not on] == ([] if precompute else [whole])
