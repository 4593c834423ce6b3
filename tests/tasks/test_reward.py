"""The reward task: scalar head on the last real token, Bradley-Terry loss, accuracy, scoring."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from conftest import WORDS, train_and_save, write_jsonl
from lmforge.config import build_config, dump_config
from lmforge.errors import LmforgeError
from lmforge.losses.preference import bradley_terry_loss
from lmforge.tasks.reward import RewardTask

POS, NEG, FILL = WORDS[:6], WORDS[6:12], WORDS[12:30]


def pref_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.sample(FILL, rng.randint(1, 4))), "chosen": " ".join(rng.sample(POS, 2)),
             "rejected": " ".join(rng.sample(NEG, rng.randint(1, 3))), "margin": rng.random()} for _ in range(n)]


def make_cfg(tmp_path, model_dir, rows, reward=None, train=None, data=None, name="run"):
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return build_config({
        "task": "reward", "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(path), "eval_fraction": 0.2, "max_length": 64} | (data or {}),
        "reward": reward or {}, "lora": {"r": 8, "alpha": 16},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-2, "progress": False, "log_every": 1} | (train or {}),
    })


@pytest.mark.parametrize("packing", [True, False])
def test_reward_is_the_head_on_the_last_real_token(tmp_path, tiny_llama_dir, packing):
    task = RewardTask(make_cfg(tmp_path, tiny_llama_dir, pref_rows(20), reward={"packing": packing},
                               data={"max_length": 128}))
    with torch.no_grad():
        for n, p in task.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    items = task.train_items[:4]
    batch = task.collate(items)
    if packing:
        assert batch["input_ids"].shape[0] < 8  # several sequences share a row
    else:
        assert batch["attention_mask"].min() == 0  # padded rows
    with torch.no_grad():
        r = task.rewards(batch)  # (8,)
        seqs = [it["prompt_ids"] + it["chosen_ids"] for it in items] + [it["prompt_ids"] + it["rejected_ids"] for it in items]
        for i, s in enumerate(seqs):
            logits = task.model(input_ids=torch.tensor([s])).logits  # HF pools the last token of an unpadded row
            assert abs(float(r[i]) - float(logits[0, 0])) < 1e-5
    assert task.tokenizer.pad_token_id is not None


def test_bradley_terry_loss_with_margin(tmp_path, tiny_llama_dir):
    rows = pref_rows(20)
    task = RewardTask(make_cfg(tmp_path, tiny_llama_dir, rows, reward={"use_margin": True},
                               data={"eval_fraction": 0.0}))
    items = task.train_items[:4]
    assert [it["margin"] for it in items] == [rows[i]["margin"] for i in range(4)]
    batch = task.collate(items)
    loss, metrics = task.loss(batch)
    with torch.no_grad():
        r = task.rewards(batch)
    want = bradley_terry_loss(r[:4], r[4:], torch.tensor([rows[i]["margin"] for i in range(4)])).mean()
    assert abs(loss.item() - float(want)) < 1e-6
    assert abs(metrics["margin"] - float((r[:4] - r[4:]).mean())) < 1e-6
    with pytest.raises(LmforgeError, match="missing column 'margin'"):
        RewardTask(make_cfg(tmp_path, tiny_llama_dir, [{k: v for k, v in x.items() if k != "margin"} for x in rows],
                            reward={"use_margin": True}, name="nomargin"))
    bad = [dict(x, margin="big") for x in rows]
    with pytest.raises(LmforgeError, match="'margin' must be a number"):
        RewardTask(make_cfg(tmp_path, tiny_llama_dir, bad, reward={"use_margin": True}, name="badmargin"))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_learns_the_preference_and_scores_files(tmp_path, tiny_llama_dir, mode, capsys):
    from lmforge.cli import main

    cfg = make_cfg(tmp_path, tiny_llama_dir, pref_rows(80), reward={"mode": mode},
                   train={"epochs": 3, "lr": 1e-2 if mode == "lora" else 2e-3})
    task = RewardTask(cfg)
    before = task.evaluate()
    after = train_and_save(task, cfg)
    assert after["accuracy"] >= 0.9 and after["accuracy"] > before["accuracy"]
    art = cfg.run_dir / ("adapter" if mode == "lora" else "model")
    assert art.is_dir()
    if mode == "lora":
        assert '"task_type": "SEQ_CLS"' in (art / "adapter_config.json").read_text()
    pairs = [{"prompt": "the movie", "response": "good great"}, {"prompt": "the movie", "response": "awful bad"}]
    src = write_jsonl(tmp_path / "score.jsonl", pairs)
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(cfg.run_dir), "--input", str(src), "--out", str(out)]) == 0
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert [s["response"] for s in scored] == ["good great", "awful bad"]
    assert scored[0]["score"] > scored[1]["score"]
    back = RewardTask.from_run(cfg.run_dir)
    assert abs(back.evaluate(task.eval_items)["accuracy"] - after["accuracy"]) < 1e-9


def test_score_needs_a_reward_run_and_a_response_column(tmp_path, tiny_llama_dir):
    from lmforge.cli import main

    cfg = make_cfg(tmp_path, tiny_llama_dir, pref_rows(20))
    task = RewardTask(cfg)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text(dump_config(cfg))
    task.save(cfg.run_dir)
    src = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "text": "b"}])
    with pytest.raises(LmforgeError, match="missing column 'response'"):
        RewardTask.from_run(cfg.run_dir).score_file(str(src))
    assert main(["score", str(cfg.run_dir), "--input", str(src)]) != 0


@pytest.mark.parametrize("packing", [True, False])
def test_sft_alpha_adds_the_chosen_responses_nll_through_the_tied_lm_head(tmp_path, tiny_llama_dir, packing):
    """GRM's hidden-state regularisation: L = (1 - a) L_BT + a * token-mean NLL of the chosen responses,
    the NLL computed here from the plain model, one sequence at a time, with the tied embeddings as head."""
    import torch.nn.functional as F

    alpha = 0.25
    task = RewardTask(make_cfg(tmp_path, tiny_llama_dir, pref_rows(20), data={"eval_fraction": 0.0},
                               reward={"sft_alpha": alpha, "packing": packing}))
    with torch.no_grad():
        for n, p in task.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    items = task.train_items[:5]
    loss, metrics = task.loss(task.collate(items))
    emb = task.model.get_input_embeddings().weight
    nll_sum, count, chosen, rejected = 0.0, 0, [], []
    with torch.no_grad():
        for it in items:
            for side, out in (("chosen", chosen), ("rejected", rejected)):
                ids = torch.tensor([it["prompt_ids"] + it[f"{side}_ids"]])
                out.append(float(task.model(input_ids=ids).logits[0, 0]))
            ids = torch.tensor([it["prompt_ids"] + it["chosen_ids"]])
            hidden = task.model.model(input_ids=ids).last_hidden_state[0]  # (T, H)
            p = len(it["prompt_ids"])
            logits = hidden[p - 1:-1] @ emb.T  # positions predicting the response tokens
            nll_sum += float(F.cross_entropy(logits, ids[0, p:], reduction="sum"))
            count += len(it["chosen_ids"])
    bt = float(bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected)).mean())
    nll = nll_sum / count
    assert metrics["sft_nll"] == pytest.approx(nll, rel=1e-4) and metrics["bt_loss"] == pytest.approx(bt, rel=1e-4)
    assert float(loss.detach()) == pytest.approx((1 - alpha) * bt + alpha * nll, rel=1e-4)
    loss.backward()  # the NLL reaches the LoRA matrices, never the frozen (tied) embeddings
    assert task.model.get_input_embeddings().weight.grad is None
    grads = {n: p.grad.clone() for n, p in task.model.named_parameters() if "lora_A" in n and p.grad is not None}
    plain = RewardTask(make_cfg(tmp_path, tiny_llama_dir, pref_rows(20), data={"eval_fraction": 0.0},
                                reward={"packing": packing}, name="plain"))
    plain.model.load_state_dict(task.model.state_dict())
    plain_loss, plain_metrics = plain.loss(plain.collate(items))
    assert "sft_nll" not in plain_metrics and float(plain_loss.detach()) == pytest.approx(bt, rel=1e-4)
    plain_loss.backward()
    plain_grads = dict(plain.model.named_parameters())
    assert any(not torch.allclose(g, plain_grads[n].grad) for n, g in grads.items())


def test_sft_alpha_reads_an_untied_lm_head_from_the_base(tmp_path, capsys):
    """A base whose LM head is not tied to its embeddings: the NLL uses the base's own head, read
    from its safetensors (at LoRA's zero start it equals the causal LM's own NLL); no head: one line."""
    import torch.nn.functional as F
    from conftest import make_tiny_llama
    from transformers import AutoConfig, LlamaForCausalLM

    from lmforge.cli import main

    model_dir = make_tiny_llama(tmp_path / "untied")
    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.tie_word_embeddings = False
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    causal = LlamaForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(causal.lm_head.weight, causal.model.embed_tokens.weight)
    task = RewardTask(make_cfg(tmp_path, model_dir, pref_rows(20), data={"eval_fraction": 0.0},
                               reward={"sft_alpha": 0.5, "packing": False}))
    items = task.train_items[:4]
    _, metrics = task.loss(task.collate(items))  # LoRA B starts at zero: the backbone is the base's
    nll, count = 0.0, 0
    with torch.no_grad():
        for it in items:
            ids = torch.tensor([it["prompt_ids"] + it["chosen_ids"]])
            p = len(it["prompt_ids"])
            nll += float(F.cross_entropy(causal(input_ids=ids).logits[0, p - 1:-1], ids[0, p:], reduction="sum"))
            count += len(it["chosen_ids"])
    assert metrics["sft_nll"] == pytest.approx(nll / count, rel=1e-4)

    from safetensors.torch import load_file, save_file

    weights = load_file(str(model_dir / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = make_cfg(tmp_path, model_dir, pref_rows(20), reward={"sft_alpha": 0.1}, name="nohead")
    (tmp_path / "r.yaml").write_text(dump_config(cfg))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no lm_head.weight in its safetensors" in err[0]
    assert not (cfg.run_dir / "adapter").exists()


def test_eval_writes_each_pairs_margin_in_file_order_for_paired_comparisons(tmp_path, tiny_llama_dir, capsys):
    from lmforge.cli import main
    from lmforge.eval.preference_pairs import pair_key

    cfg = make_cfg(tmp_path, tiny_llama_dir, pref_rows(16), train={"epochs": 1})
    task = RewardTask(cfg)
    train_and_save(task, cfg)
    rows = pref_rows(10, seed=5)
    items = task.read_eval_file(str(write_jsonl(tmp_path / "held.jsonl", rows)))
    report = task.evaluate(items[::-1])  # scored out of file order
    pairs = report["pairs"]
    assert pairs["index"] == list(range(10)) and pairs["key"] == [pair_key(r) for r in rows]
    for j in (0, 4, 9):  # margin j is pair j's own margin
        assert abs(pairs["margin"][j] - task.evaluate([items[j]])["mean_margin"]) < 1e-4
    assert report["accuracy"] == sum(m > 0 for m in pairs["margin"]) / 10
    first = tmp_path / "first.json"
    assert main(["eval", str(cfg.run_dir), "--data", str(tmp_path / "held.jsonl"), "--out", str(first)]) == 0
    capsys.readouterr()
    assert main(["eval", str(first), "--paired-with", str(first)]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert out["n"] == 10 and out["accuracy_diff"] == 0.0 and out["a_only"] == out["b_only"] == 0


def test_score_with_an_ensemble_averages_the_runs_scores(tmp_path, tiny_llama_dir, capsys):
    """`lmforge score RUN --ensemble RUN2`: each row's score is the mean of the runs' scores, which are
    the scores each run gives alone; runs keeping other rows (data.where) or a missing run: exit 2."""
    from lmforge.cli import main

    runs = []
    for seed, name in ((1, "a"), (2, "b")):
        cfg = make_cfg(tmp_path, tiny_llama_dir, pref_rows(40), name=name, train={"epochs": 2})
        cfg.seed = seed
        train_and_save(RewardTask(cfg), cfg)
        runs.append(str(cfg.run_dir))
    rows = [{"prompt": "the movie", "response": r} for r in ("good great", "awful bad", "fine", "great good")]
    src = write_jsonl(tmp_path / "score.jsonl", rows)
    alone = []
    for run in runs:
        out = tmp_path / f"alone_{Path(run).name}.jsonl"
        assert main(["score", run, "--input", str(src), "--out", str(out)]) == 0
        alone.append([json.loads(x)["score"] for x in out.read_text().splitlines()])
    assert alone[0] != alone[1]  # two different models
    out = tmp_path / "ens.jsonl"
    assert main(["score", runs[0], "--ensemble", runs[1], "--input", str(src), "--out", str(out)]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["response"] for g in got] == [r["response"] for r in rows]
    for i, g in enumerate(got):
        assert g["scores"] == pytest.approx([alone[0][i], alone[1][i]], abs=1e-5)
        assert g["score"] == pytest.approx((alone[0][i] + alone[1][i]) / 2, abs=1e-5)
    capsys.readouterr()
    assert main(["score", runs[0], "--ensemble", str(tmp_path / "nope"), "--input", str(src)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    cfg_b = Path(runs[1]) / "config.yaml"  # run b now keeps only some rows
    conf = yaml.safe_load(cfg_b.read_text())
    conf["data"]["where"] = {"response": ["good great", "awful bad", "great good"]}
    cfg_b.write_text(yaml.safe_dump(conf))
    assert main(["score", runs[0], "--ensemble", runs[1], "--input", str(src), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "an ensemble needs the same rows" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()
