"""sft on tiny T5 and BART: items, teacher forcing against transformers' own loss, training in full
and adapter modes, PEFT SEQ_2_SEQ_LM folders, reloading a run, ROUGE of generations."""
from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import WORDS, write_jsonl
from lmforge.config import build_config, dump_config
from lmforge.errors import LmforgeError
from lmforge.tasks.sft import SftTask
from lmforge.train import fit


def copy_rows(n: int, seed: int = 0) -> list[dict]:
    """Learnable pairs: the completion repeats the dialogue's first two words."""
    rng = random.Random(seed)
    return [{"dialogue": " ".join(a), "summary": " ".join(a[:2])}
            for a in (rng.sample(WORDS[:16], 4) for _ in range(n))]


def make_cfg(tmp_path, model_dir, rows, sft=None, train=None, adapter=None, name="run", data=None):
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return build_config({
        "task": "sft", "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(path), "eval_fraction": 0.2, "max_length": 32,
                 "columns": {"completion": "summary"}} | (data or {}),
        "sft": {"prompt_template": "story: {dialogue}", "rouge_samples": 4, "max_new_tokens": 6} | (sft or {}),
        "adapter": {"kind": "lora", "r": 8, "alpha": 16} | (adapter or {}),
        "train": {"epochs": 3, "batch_size": 8, "lr": 1e-2, "progress": False, "log_every": 1} | (train or {}),
    })


def train(cfg):
    task = SftTask(cfg)
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    before = task.evaluate()
    after = fit(task, cfg, run)
    task.save(run)
    return task, before, after


@pytest.mark.parametrize("kind", ["t5", "flan", "bart"])
def test_items_and_loss_equal_transformers_teacher_forcing(kind, tmp_path, request):
    folder = request.getfixturevalue(f"tiny_{kind}_dir")
    task = SftTask(make_cfg(tmp_path, folder, copy_rows(10), sft={"mode": "full"}))
    assert task.seq2seq and task.peft_task_type == "SEQ_2_SEQ_LM"
    it = task.train_items[0]
    tok = task.tokenizer
    assert tok.convert_ids_to_tokens(it["input_ids"])[:2] == (["<s>", "story"] if kind == "bart" else ["story", ":"])
    assert it["labels"][-1] == tok.eos_token_id and it["input_ids"][-1] == tok.eos_token_id
    batch = task.collate(task.train_items[:4])
    assert task.batch_units(batch) == sum(len(i["labels"]) for i in task.train_items[:4])
    loss, _ = task.loss(batch)
    labels = batch["targets"]
    ref = task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)  # transformers' own shift and loss


@pytest.mark.parametrize("kind,adapter,lr", [("t5", {"kind": "lora"}, 3e-2), ("bart", {"kind": "lora"}, 3e-2),
                                             ("t5", {"kind": "dora", "r": 4}, 3e-2),
                                             ("t5", {"kind": "ia3", "r": None, "alpha": None}, 0.1),
                                             ("flan", {"kind": "bottleneck", "r": None, "alpha": None,
                                                       "reduction_factor": 4}, 3e-2),
                                             ("t5", {"kind": "prompt", "r": None, "alpha": None,
                                                       "num_virtual_tokens": 4}, 0.3)])
def test_adapter_training_learns_and_saves_a_peft_seq2seq_folder(kind, adapter, lr, tmp_path, request):
    folder = request.getfixturevalue(f"tiny_{kind}_dir")
    opts = {"kind": "lora", "r": 8, "alpha": 16} | adapter
    opts = {k: v for k, v in opts.items() if v is not None}
    cfg = build_config(make_cfg(tmp_path, folder, copy_rows(48), train={"lr": lr}).model_dump(mode="json")
                       | {"adapter": opts})
    task, before, after = train(cfg)
    assert after["loss"] < before["loss"] - 0.15, (before["loss"], after["loss"])
    assert {"rouge1", "rougeL", "rouge_n"} <= set(after) and after["rouge_n"] == 4
    conf = json.loads((cfg.run_dir / "adapter" / "adapter_config.json").read_text())
    assert conf["task_type"] == "SEQ_2_SEQ_LM" and conf["base_model_name_or_path"] == str(folder)
    again = SftTask.from_run(cfg.run_dir)
    assert again.seq2seq
    items = task.eval_items
    assert abs(again.evaluate(items)["loss"] - task.evaluate(items)["loss"]) < 1e-5
    if opts["kind"] == "ia3":  # T5 defaults: peft's placement (keys, values, feed-forward output)
        assert {t.rsplit(".", 1)[-1] for t in conf["target_modules"]} == {"k", "v", "wo"}
        assert {t.rsplit(".", 1)[-1] for t in conf["feedforward_modules"]} == {"wo"}
    if opts["kind"] == "bottleneck":  # no peft kind: our own type in the same layout
        assert conf["peft_type"] == "BOTTLENECK" and all(t.endswith("wo") for t in conf["target_modules"])
        return
    # peft loads the run's adapter folder onto the base and gives the run's logits
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSeq2SeqLM

    pm = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(folder), str(cfg.run_dir / "adapter"))
    batch = task.collate(items[:3])
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    with torch.no_grad():
        torch.testing.assert_close(pm.eval()(**kw).logits, again.model(**kw).logits, atol=1e-5, rtol=1e-5)


def test_full_fine_tuning_saves_a_model_folder_that_reloads(tmp_path, tiny_t5_dir):
    cfg = make_cfg(tmp_path, tiny_t5_dir, copy_rows(32), sft={"mode": "full"}, train={"lr": 3e-3, "epochs": 2})
    task, before, after = train(cfg)
    assert after["loss"] < before["loss"]
    from transformers import AutoModelForSeq2SeqLM

    saved = AutoModelForSeq2SeqLM.from_pretrained(cfg.run_dir / "model")
    assert saved.config.is_encoder_decoder
    again = SftTask.from_run(cfg.run_dir)
    assert abs(again.evaluate(task.eval_items)["loss"] - after["loss"]) < 1e-4


def test_eval_base_reports_the_model_with_adapters_off(tmp_path, tiny_bart_dir):
    cfg = make_cfg(tmp_path, tiny_bart_dir, copy_rows(24), sft={"eval_base": True}, train={"epochs": 1})
    task = SftTask(cfg)
    first = task.evaluate()
    assert abs(first["base_loss"] - first["loss"]) < 1e-5  # LoRA B starts at 0


def test_seq2seq_bad_inputs(tmp_path, tiny_t5_dir):
    rows = copy_rows(8)
    with pytest.raises(LmforgeError, match="packing: not available for seq2seq"):
        SftTask(make_cfg(tmp_path, tiny_t5_dir, rows, sft={"packing": True}))
    with pytest.raises(LmforgeError, match="qlora is not available for seq2seq"):
        SftTask(make_cfg(tmp_path, tiny_t5_dir, rows, sft={"mode": "qlora"}))
    text_rows = [{"text": r["dialogue"]} for r in rows]
    with pytest.raises(LmforgeError, match="seq2seq sft trains on prompt \\+ completion"):
        SftTask(make_cfg(tmp_path, tiny_t5_dir, text_rows, sft={"prompt_template": None}, name="text"))


def test_truncation_is_counted_and_keeps_the_closing_eos(tmp_path, tiny_t5_dir):
    rows = copy_rows(10)
    rows[2] = {"dialogue": " ".join(["good"] * 50), "summary": " ".join(["bad"] * 50)}
    task = SftTask(make_cfg(tmp_path, tiny_t5_dir, rows, data={"eval_fraction": 0.0},
                            sft={"max_target_length": 8}))
    long = max(task.train_items, key=lambda it: len(it["input_ids"]))
    assert len(long["input_ids"]) == 32 and long["input_ids"][-1] == task.tokenizer.eos_token_id
    assert len(long["labels"]) == 8 and long["labels"][-1] == task.tokenizer.eos_token_id
    assert task.reports[0].truncated == 1
    ev = SftTask(make_cfg(tmp_path, tiny_t5_dir, rows, data={"eval_fraction": 0.0, "eval": str(
        write_jsonl(tmp_path / "ev.jsonl", [rows[2], rows[0]]))}, sft={"max_target_length": 8}))
    cut, whole = ev.eval_items
    assert cut["prompt"] == "story : " + " ".join(["good"] * 29) and whole["prompt"] == "story: " + rows[0]["dialogue"]
    assert ev.tokenizer(cut["prompt"])["input_ids"] == cut["input_ids"]  # generation reads what training read
