"""The run report on real runs: a non-finite-loss stop recorded by the engine and shown as such;
sample generations before and after training (sft, preference), the generation phase's progress,
and rows dropped or truncated by max_length in eval.json."""
from __future__ import annotations

import json
import random

import pytest

from conftest import WORDS, sentiment_rows, write_jsonl
from lmforge.cli import main
from lmforge.config import build_config, dump_config
from lmforge.report import load_run, warnings_for
from lmforge.report.analysis import summary
from lmforge.tasks import TASKS
from lmforge.tasks.classify import ClassifyTask


class NanAtStep5(ClassifyTask):
    def loss(self, batch):
        loss, metrics = super().loss(batch)
        self.calls = getattr(self, "calls", 0) + 1
        return (loss * float("nan") if self.calls == 5 else loss), metrics


def test_nan_stop_is_recorded_and_reported(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(40, seed=11))
    cfg = build_config({
        "task": "classify", "name": "nan", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval_fraction": 0.2}, "classify": {"mode": "full"},
        "train": {"max_steps": 8, "batch_size": 8, "save_every": 3, "progress": False, "log_every": 1}})
    (tmp_path / "r.yaml").write_text(dump_config(cfg))
    monkeypatch.setitem(TASKS, "classify", NanAtStep5)
    assert main(["train", str(tmp_path / "r.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite loss (nan) at step 5" in err[0]
    run = cfg.run_dir
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1] | {"time": 0} == {"split": "event", "time": 0, "step": 5, "event": "stopped",
                                      "reason": "non-finite loss", "loss": "nan"}
    assert max(r["step"] for r in rows if r["split"] == "train") == 4  # the bad step itself is not a train row
    assert not (run / "eval.json").exists() and (run / "report.html").is_file()  # written although it stopped
    data = load_run(run)
    warns = warnings_for(data)
    assert warns[0] == "stopped at step 5: non-finite loss (the last good checkpoint is kept)"
    assert not any("did not finish" in w for w in warns)
    assert summary(data)["status"] == "stopped at step 5: non-finite loss"
    assert "stopped at step 5: non-finite loss" in (run / "report.html").read_text()


def _copy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = rng.sample(WORDS[:16], 4)
        rows.append({"prompt": " ".join(a), "completion": " ".join(a[:2]) + " " + " ".join(rng.choices(WORDS, k=80))})
    return rows


def test_sft_samples_before_after_progress_and_truncation(tmp_path, tiny_llama_dir, capsys):
    import lmforge

    rows = _copy_rows(40, seed=3)
    write_jsonl(tmp_path / "d.jsonl", rows)
    run = lmforge.train({
        "task": "sft", "name": "sft", "output_dir": str(tmp_path / "runs"), "seed": 0,
        "model": {"name": str(tiny_llama_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "d.jsonl"), "eval_fraction": 0.25, "max_length": 64},
        "sft": {"mode": "lora", "rouge_samples": 10, "generation_batch_size": 4, "max_new_tokens": 6,
                "report_samples": 2},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 5e-2, "progress": True, "log_every": 1}}).run_dir
    err = capsys.readouterr().err
    assert err.count("samples 2/2 (100%)") == 2                 # before and after training
    assert "generate (eval) 10/10 (100%)" in err                # the eval generation phase (3 batches)
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [set(s) for s in samples] == [{"input", "before", "after", "reference"}] * 2
    prompts = [s["input"] for s in samples]
    # before: the untrained model's greedy text; after: the trained run's (both regenerated independently)
    base = lmforge.generate(str(tiny_llama_dir), prompts, max_new_tokens=6, precision="fp32")
    tuned = lmforge.generate(str(run), prompts, max_new_tokens=6, precision="fp32")
    assert [s["before"] for s in samples] == base and [s["after"] for s in samples] == tuned
    assert base != tuned
    final = json.loads((run / "eval.json").read_text())
    rep = final["data_report"]
    assert rep["train"]["total"] == 30 and rep["train"]["truncated"] == 30 and rep["eval"]["truncated"] == 10
    html = (run / "report.html").read_text()
    assert "Sample generations before and after training" in html


def test_preference_samples_before_after(tmp_path, tiny_llama_dir):
    import lmforge

    rng = random.Random(1)
    rows = [{"prompt": " ".join(rng.sample(WORDS, 4)), "chosen": " ".join(rng.sample(WORDS, 3)),
             "rejected": " ".join(rng.sample(WORDS, 3))} for _ in range(24)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    run = lmforge.train({
        "task": "preference", "name": "dpo", "output_dir": str(tmp_path / "runs"), "seed": 0,
        "model": {"name": str(tiny_llama_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "p.jsonl"), "eval_fraction": 0.25, "max_length": 32},
        "preference": {"mode": "lora", "report_samples": 2}, "adapter": {"kind": "lora", "r": 8, "alpha": 16},
        "train": {"max_steps": 2, "batch_size": 6, "lr": 5e-2, "progress": False}}).run_dir
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all({"input", "before", "after", "reference"} == set(s) for s in samples)
    eval_rows = [r for r in rows if r["prompt"] in {s["input"] for s in samples}]
    assert [s["reference"] for s in samples] == [r["chosen"] for r in eval_rows][:2]
    base = lmforge.generate(str(tiny_llama_dir), [s["input"] for s in samples], max_new_tokens=64, precision="fp32")
    assert [s["before"] for s in samples] == base
    assert "data_report" not in json.loads((run / "eval.json").read_text())  # nothing dropped or cut


@pytest.mark.parametrize("n", [0])
def test_report_samples_zero_generates_nothing(tmp_path, tiny_llama_dir, n):
    import lmforge

    write_jsonl(tmp_path / "d.jsonl", _copy_rows(16, seed=4))
    run = lmforge.train({
        "task": "sft", "name": "none", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_llama_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "d.jsonl"), "eval_fraction": 0.25, "max_length": 128},
        "sft": {"mode": "lora", "report_samples": n}, "train": {"max_steps": 1, "batch_size": 8, "progress": False}})
    assert not (run.run_dir / "samples.jsonl").exists()
    assert "data_report" not in json.loads((run.run_dir / "eval.json").read_text())


def test_classify_sample_predictions_before_after(tmp_path, tiny_bert_dir):
    import lmforge

    write_jsonl(tmp_path / "d.jsonl", sentiment_rows(40, seed=5))
    run = lmforge.train({
        "task": "classify", "name": "cls", "output_dir": str(tmp_path / "runs"), "seed": 0,
        "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "d.jsonl"), "eval_fraction": 0.25, "max_length": 32},
        "classify": {"mode": "full"}, "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "progress": False}})
    samples = [json.loads(x) for x in (run.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and all(set(s) == {"input", "before", "after", "reference"} for s in samples)
    again = lmforge.load(run.run_dir).predict([s["input"] for s in samples])  # the saved model, reloaded
    assert [s["after"] for s in samples] == [f"{p['label']} ({p['score']:.2f})" for p in again]
    assert {s["reference"] for s in samples} <= {"neg", "pos"}
