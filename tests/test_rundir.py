"""The run directory's owner: layout, opening a run, and no data loss (overwrite, resume, stops, temp files)."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from conftest import sentiment_rows, write_jsonl, write_yaml

from lmforge import rundir
from lmforge.cli import main
from lmforge.config import build_config, dump_config
from lmforge.errors import LmforgeError
from lmforge.train import checkpoint as ckpt


def _recipe(tmp_path, model_dir, **extra):
    if not (tmp_path / "train.jsonl").exists():
        write_jsonl(tmp_path / "train.jsonl", sentiment_rows(24, seed=1))
        write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(8, seed=2))
    raw = {"task": "classify", "name": "r", "output_dir": str(tmp_path / "runs"), "seed": 0,
           "model": {"name": str(model_dir), "precision": "fp32", "device": "cpu"},
           "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
           "classify": {"mode": "full"},
           "train": {"max_steps": 4, "batch_size": 8, "save_every": 2, "log_every": 1, "progress": False}}
    for k, v in extra.items():
        raw[k] = raw.get(k, {}) | v if isinstance(v, dict) else v
    return write_yaml(tmp_path / "r.yaml", raw)


def _err(capsys) -> str:
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    return lines[0]


def _steps(run_dir, split="train"):
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split]


# ---------------------------------------------------------------- layout: is_run_dir, open_run
def test_is_run_dir_recognises_only_lmforge_runs(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("task: classify\nname: run\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("foo: bar\n")          # some other tool's config
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.yaml").write_text("task: x\n")
    (tmp_path / "hf" / "config.json").write_text("{}")                      # a model folder
    assert rundir.is_run_dir(tmp_path / "run")
    assert not rundir.is_run_dir(tmp_path / "other")
    assert not rundir.is_run_dir(tmp_path / "hf")
    assert not rundir.is_run_dir(tmp_path / "missing")


def test_open_run_chooses_final_best_or_a_step(tmp_path, tiny_bert_dir):
    recipe = _recipe(tmp_path, tiny_bert_dir, train={"eval_every": 2, "best_metric": "loss",
                                                     "greater_is_better": False})
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "runs" / "r"
    final = rundir.open_run(run)
    assert (final.checkpoint, final.root, final.kind, final.artefact) == ("final", run, "model", run / "model")
    assert final.config.task == "classify" and final.mode == "full" and not final.base_4bit
    best = rundir.open_run(run, "best")
    assert best.root == run / "best" and best.kind == "model" and best.file("labels.json").is_file()
    step = rundir.open_run(run, "step-2")
    assert step.kind == "checkpoint" and step.root == run / "checkpoints" / "step-00000002"
    with pytest.raises(LmforgeError, match=r"no complete checkpoint step-3 \(have: step-2, step-4\)"):
        rundir.open_run(run, "step-3")
    with pytest.raises(LmforgeError, match="use final, best or step-N"):
        rundir.open_run(run, "latest")
    with pytest.raises(LmforgeError, match="not an lmforge run directory"):
        rundir.open_run(tmp_path)
    assert final.require("model") == run / "model"
    with pytest.raises(LmforgeError, match=r"adapter: missing in the run \(it has model/\)"):
        final.require("adapter")


def test_read_config_is_one_line_on_bad_bytes(tmp_path):
    (tmp_path / "config.yaml").write_bytes(b"task: classify\nname: \xff\xfe\n")
    with pytest.raises(LmforgeError, match="not UTF-8"):
        rundir.read_config(tmp_path)


# ---------------------------------------------------------------- overwrite
def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, tiny_bert_dir, capsys):
    precious = tmp_path / "runs" / "r"
    precious.mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    recipe = _recipe(tmp_path, tiny_bert_dir)
    assert main(["train", str(recipe), "overwrite=true"]) == 2
    assert "is not an lmforge run" in _err(capsys)
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.tex"]


def test_overwrite_checks_the_new_run_before_touching_the_old(tmp_path, tiny_bert_dir, capsys):
    recipe = _recipe(tmp_path, tiny_bert_dir)
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "r"
    before = {p.name for p in run.iterdir()}
    weights = (run / "model" / "model.safetensors").read_bytes()
    # bad data: refused before anything is written, the old run stays whole
    assert main(["train", str(recipe), "overwrite=true", f"data.train={tmp_path / 'missing.jsonl'}"]) == 2
    assert "missing.jsonl" in _err(capsys)
    assert {p.name for p in run.iterdir()} == before
    assert (run / "model" / "model.safetensors").read_bytes() == weights
    # a good new run replaces it, with nothing of the old one left and no temporary folders
    assert main(["train", str(recipe), "overwrite=true", "train.max_steps=2"]) == 0
    assert json.loads((run / "eval.json").read_text())["step"] == 2
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-00000002"]
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------- resume
def test_resume_with_a_config_that_changes_training_is_refused_before_writing(tmp_path, tiny_bert_dir, capsys):
    recipe = _recipe(tmp_path, tiny_bert_dir)
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "r"
    saved = (run / "config.yaml").read_bytes()
    stamp = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert main(["train", str(recipe), "train.resume=true", "train.batch_size=4", "data.max_length=16"]) == 2
    err = _err(capsys)
    assert "train.resume=true refused" in err and "train.batch_size: 8 -> 4" in err and "data.max_length" in err
    assert (run / "config.yaml").read_bytes() == saved
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == stamp
    # what only says how long / how often may change
    assert main(["train", str(recipe), "train.resume=true", "train.max_steps=6", "train.log_every=2"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 6


def test_every_resume_message_names_the_key(tmp_path, tiny_bert_dir, capsys):
    odd = tmp_path / "runs" / "r"
    odd.mkdir(parents=True)
    (odd / "notes.txt").write_text("x")                 # not a run: resume will not touch it
    assert main(["train", str(_recipe(tmp_path, tiny_bert_dir)), "train.resume=true"]) == 2
    assert "train.resume=true" in _err(capsys)
    (odd / "notes.txt").unlink()
    cfg = build_config(yaml.safe_load((tmp_path / "r.yaml").read_text()))
    (odd / "config.yaml").write_text(dump_config(cfg))
    (odd / "eval.json").write_text("{}")                # a finished run, no resume asked for
    with pytest.raises(LmforgeError, match=r"run directory exists; set train\.resume=true"):
        rundir.check_run(cfg)


def test_resume_without_checkpoints_says_it_starts_at_step_0(tmp_path, tiny_bert_dir, caplog):
    recipe = _recipe(tmp_path, tiny_bert_dir, train={"save_every": None})
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "runs" / "r"
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        assert main(["train", str(recipe), "train.resume=true"]) == 0
    assert any("no checkpoint" in r.getMessage() and "step 0" in r.getMessage() for r in caplog.records)
    assert _steps(run) == [1, 2, 3, 4]                      # each step once, not 1-4 twice


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_bert_dir, caplog):
    recipe = _recipe(tmp_path, tiny_bert_dir, train={"max_steps": 6})
    assert main(["train", str(recipe), "train.max_steps=4"]) == 0      # checkpoints 2 and 4
    run = tmp_path / "runs" / "r"
    newest = run / "checkpoints" / "step-00000004"
    (newest / "trainable.safetensors").write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        assert main(["train", str(recipe), "train.resume=true"]) == 0
    msgs = " | ".join(r.getMessage() for r in caplog.records)
    assert "unreadable checkpoint" in msgs and "previous complete checkpoint" in msgs and "step 2" in msgs
    assert _steps(run) == [1, 2, 3, 4, 5, 6]                 # 3-4 done again, logged once
    assert json.loads((run / "eval.json").read_text())["step"] == 6
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator(
        str(run / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]   # TensorBoard too


def test_missing_optimizer_state_is_one_line(tmp_path, tiny_bert_dir, capsys):
    recipe = _recipe(tmp_path, tiny_bert_dir, train={"save_every": 4, "max_steps": 6})
    assert main(["train", str(recipe), "train.max_steps=4"]) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "r"
    (run / "checkpoints" / "step-00000004" / "optimizer.pt").unlink()
    saved = (run / "config.yaml").read_bytes()                 # max_steps 4; the resume asks for 6
    assert main(["train", str(recipe), "train.resume=true"]) == 2
    err = _err(capsys)
    assert "train.resume=true" in err and "no optimizer state (optimizer.pt)" in err
    assert (run / "config.yaml").read_bytes() == saved         # a failed resume never rewrites it


# ---------------------------------------------------------------- stopped runs, temporary folders
def test_a_stopped_run_does_not_block_the_same_command(tmp_path, tiny_bert_dir):
    recipe = _recipe(tmp_path, tiny_bert_dir, train={"save_every": None})
    cfg = build_config(yaml.safe_load(recipe.read_text()))
    run = rundir.prepare_run(cfg)                       # started, then stopped before saving anything
    (run / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": NaN}\n')
    (run / ".tmp-eval.json-abc").write_text("half")    # a killed write
    assert rundir.check_run(cfg) == "restart"
    assert main(["train", str(recipe)]) == 0
    assert _steps(run) == [1, 2, 3, 4]
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_stale_temporary_folders_are_cleaned_on_the_next_start(tmp_path, tiny_bert_dir):
    recipe = _recipe(tmp_path, tiny_bert_dir, train={"max_steps": 6})
    assert main(["train", str(recipe), "train.max_steps=4"]) == 0
    run = tmp_path / "runs" / "r"
    (run / "checkpoints" / ".tmp-step-00000005").mkdir()
    (run / ".tmp-model-xyz").mkdir()
    assert main(["train", str(recipe), "train.resume=true"]) == 0
    assert not list(run.rglob(".tmp-*"))


def test_truncate_metrics_drops_later_steps_only(tmp_path):
    rows = [{"split": "train", "step": s} for s in (1, 2, 3)] + [{"split": "eval", "step": 2}, {"note": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    assert rundir.truncate_metrics(tmp_path, 2) == 1
    kept = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert kept[-1] == "not json" and len(kept) == 5


def test_atomic_dir_replaces_only_on_success(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with rundir.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    with rundir.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]


def test_a_step_checkpoint_loads_as_a_run(tmp_path, tiny_bert_dir):
    from safetensors.torch import load_file

    import lmforge

    assert main(["train", str(_recipe(tmp_path, tiny_bert_dir))]) == 0   # full fine-tune, checkpoints 2 and 4
    run = tmp_path / "runs" / "r"
    step2 = lmforge.load(run, checkpoint="step-2")
    saved = load_file(str(run / "checkpoints" / "step-00000002" / "trainable.safetensors"))
    params = dict(step2.task.model.named_parameters())
    assert all(torch.equal(params[k].detach().float(), v.float()) for k, v in saved.items())
    final = lmforge.load(run)
    moved = [k for k, v in final.task.model.named_parameters() if not torch.equal(v.detach().float(), saved[k].float())]
    assert moved                                          # steps 3-4 changed the weights
    p2, pf = step2.predict(["good great"])[0], final.predict(["good great"])[0]
    assert p2["probs"] != pf["probs"]


def test_a_run_stopped_by_nan_can_be_resumed_or_overwritten(tmp_path, tiny_bert_dir, monkeypatch, capsys):
    from lmforge.tasks import TASKS
    from lmforge.tasks.classify import ClassifyTask

    class NanAt3(ClassifyTask):
        calls = 0

        def loss(self, batch):
            loss, metrics = super().loss(batch)
            type(self).calls += 1
            return (loss * float("nan") if type(self).calls == 3 else loss), metrics

    recipe = _recipe(tmp_path, tiny_bert_dir)
    monkeypatch.setitem(TASKS, "classify", NanAt3)
    assert main(["train", str(recipe)]) == 1
    assert "non-finite loss" in _err(capsys)
    run = tmp_path / "runs" / "r"
    assert rundir.is_run_dir(run) and [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-00000002"]
    monkeypatch.setitem(TASKS, "classify", ClassifyTask)           # the cause fixed (e.g. a lower lr)
    assert main(["train", str(recipe), "train.resume=true"]) == 0  # continues from step 2
    assert _steps(run) == [1, 2, 3, 4] and json.loads((run / "eval.json").read_text())["step"] == 4
    NanAt3.calls = 0
    monkeypatch.setitem(TASKS, "classify", NanAt3)
    assert main(["train", str(recipe), "overwrite=true"]) == 1     # stopped again: the old run was replaced
    capsys.readouterr()
    monkeypatch.setitem(TASKS, "classify", ClassifyTask)
    assert main(["train", str(recipe), "overwrite=true"]) == 0
    assert _steps(run) == [1, 2, 3, 4]


def test_resuming_a_run_whose_config_cannot_be_read_names_the_key(tmp_path, tiny_bert_dir, capsys):
    recipe = _recipe(tmp_path, tiny_bert_dir)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("task: classify\nmodel: {name: x}\nbogus: 1\n")
    (run / "eval.json").write_text("{}")
    assert main(["train", str(recipe), "train.resume=true"]) == 2
    err = _err(capsys)
    assert err.count("train.resume=true") == 1 and "unknown key 'bogus'" in err
    assert (run / "config.yaml").read_text().endswith("bogus: 1\n")


def test_written_files_and_folders_get_the_usual_modes(tmp_path):
    import os
    import stat

    from lmforge.rundir import atomic_dir, write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            write_text(d / "b.txt", "y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644  # not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755       # not mkdtemp's 0700
