"""Sequence classification on encoder (BERT) and decoder (Llama) backbones: full, frozen and LoRA."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import sentiment_rows, write_jsonl

from lmforge.adapters import LoraLinear, trainable_parameters
from lmforge.commands.core import prepare_run_dir
from lmforge.config import build_config
from lmforge.tasks.classify import ClassifyTask
from lmforge.train import fit

BACKBONES = {  # fixture name, head, last block prefix, default LoRA targets found
    "bert": ("tiny_bert_dir", "classifier", "bert.encoder.layer.1.", ["query", "key", "value"]),
    "llama": ("tiny_llama_dir", "score", "model.layers.1.", ["q_proj", "k_proj", "v_proj"]),
}


def _cfg(tmp_path, model_dir, mode, n_train=32, name="run", classify=None, **train):
    if not (tmp_path / "train.jsonl").exists():
        write_jsonl(tmp_path / "train.jsonl", sentiment_rows(n_train, seed=1))
        write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(64, seed=2))
    return build_config({
        "task": "classify", "name": name, "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 32},
        "classify": {"mode": mode} | (classify or {}),
        "train": {"batch_size": 16, "progress": False, "log_every": 5} | train})


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_training_modes_choose_the_trainable_parameters(request, tmp_path, backbone):
    fixture, head, last_block, targets = BACKBONES[backbone]
    model_dir = request.getfixturevalue(fixture)

    full = ClassifyTask(_cfg(tmp_path, model_dir, "full")).model
    assert _trainable(full) == {n for n, _ in full.named_parameters()}
    assert full.config.num_labels == 2 and full.config.id2label == {0: "neg", 1: "pos"}

    frozen = ClassifyTask(_cfg(tmp_path, model_dir, "frozen")).model
    assert _trainable(frozen) and all(n.startswith(head + ".") for n in _trainable(frozen))

    plus_last = ClassifyTask(_cfg(tmp_path, model_dir, "frozen", classify={"unfreeze_last": 1})).model
    block = {n for n, _ in plus_last.named_parameters() if n.startswith(last_block)}
    assert block and _trainable(plus_last) == _trainable(frozen) | block

    lora = ClassifyTask(_cfg(tmp_path, model_dir, "lora")).model
    wrapped = {n.rsplit(".", 1)[-1] for n, m in lora.named_modules() if isinstance(m, LoraLinear)}
    assert wrapped == set(targets)
    assert sum(isinstance(m, LoraLinear) for m in lora.modules()) == 3 * 2      # 3 targets x 2 layers
    counts = trainable_parameters(lora)
    assert 0 < counts["percent"] < 20
    names = _trainable(lora)
    assert all("lora_" in n or f"{head}." in n for n in names)
    assert any(f"{head}." in n for n in names)                                    # the new head trains in full


def test_a_fresh_task_is_seeded_by_the_run_seed(tmp_path, tiny_bert_dir):
    a = ClassifyTask(_cfg(tmp_path, tiny_bert_dir, "lora")).model
    b = ClassifyTask(_cfg(tmp_path, tiny_bert_dir, "lora")).model
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


TRAIN = {  # (backbone, mode): training examples and settings that learn the synthetic task
    ("bert", "full"): dict(n_train=160, lr=3e-3, epochs=4),
    ("bert", "lora"): dict(n_train=400, lr=1e-2, epochs=5),
    ("llama", "full"): dict(n_train=160, lr=3e-3, epochs=4),
    ("llama", "lora"): dict(n_train=400, lr=1e-2, epochs=4),
}


@pytest.mark.parametrize("backbone,mode", TRAIN)
def test_training_learns_the_sentiment_task(request, tmp_path, backbone, mode):
    model_dir = request.getfixturevalue(BACKBONES[backbone][0])
    cfg = _cfg(tmp_path, model_dir, mode, **TRAIN[backbone, mode])
    task = ClassifyTask(cfg)
    run_dir = prepare_run_dir(cfg)
    before = task.evaluate()["accuracy"]
    fit(task, cfg, run_dir)
    task.save(run_dir)
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["accuracy"] > 0.9, (before, report["accuracy"])
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix", "loss", "step"} <= set(report)
    assert set(report["per_class"]) == {"neg", "pos"}
    assert sum(map(sum, report["confusion_matrix"])) == 64
    assert report["per_class"]["pos"]["support"] == sum(report["confusion_matrix"][1])

    artefact = run_dir / ("adapter" if mode == "lora" else "model")
    assert artefact.is_dir() and json.loads((run_dir / "labels.json").read_text()) == ["neg", "pos"]
    reloaded = ClassifyTask.from_run(run_dir)
    torch.testing.assert_close(reloaded.predict_items(task.eval_items), task.predict_items(task.eval_items),
                               rtol=0, atol=1e-5)
