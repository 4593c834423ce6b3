"""Recipes, dotted overrides and one-line config errors, through `lmforge config show` / `lmforge train`."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import sentiment_rows, write_jsonl, write_yaml

from lmforge.cli import main
from lmforge.config import RunConfig, apply_overrides, build_config, dump_config, load_config, read_yaml
from lmforge.errors import LmforgeError
from lmforge.tasks.classify import ClassifyRun


def _recipe(tmp_path: Path, model: str = "some-model", **top) -> Path:
    raw = {"task": "classify", "name": "r", "output_dir": str(tmp_path / "runs"),
           "model": {"name": model, "precision": "fp32"},
           "data": {"train": str(tmp_path / "train.jsonl")},
           "train": {"batch_size": 8, "progress": False}}
    raw.update(top)
    return write_yaml(tmp_path / "recipe.yaml", raw)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("lmforge: error: ")
    return err[0]


def test_config_show_applies_dotted_overrides(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    rc = main(["config", "show", str(recipe), "train.lr=0.5", "train.max_steps=7", "classify.mode=frozen",
               "data.columns.text=sentence", "data.labels=[neg, pos]", "lora.target_modules=q_proj",
               "model.revision="])
    assert rc == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == 0.5 and shown["train"]["max_steps"] == 7
    assert shown["train"]["batch_size"] == 8                  # from the recipe
    assert shown["train"]["grad_accum"] == 1                  # default filled in
    assert shown["classify"] == {"mode": "frozen", "unfreeze_last": 0}
    assert shown["data"]["columns"] == {"text": "sentence"}
    assert shown["data"]["labels"] == ["neg", "pos"]
    assert shown["lora"]["target_modules"] == "q_proj"
    assert shown["model"]["revision"] is None
    assert not (tmp_path / "runs").exists()


def test_numbers_are_accepted_for_text_values(tmp_path):
    cfg = load_config(_recipe(tmp_path), ["name=2024", "data.labels=[0, 1]", "model.revision=20240101"])
    assert cfg.name == "2024" and cfg.data.labels == ["0", "1"] and cfg.model.revision == "20240101"


def test_overrides_parse_values_as_yaml():
    raw = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=true", "a.d=x: y:", "e.f.g=1.5e-3", "h=[1, 2]"])
    assert raw == {"a": {"b": 2, "c": True, "d": "x: y:"}, "e": {"f": {"g": 1.5e-3}}, "h": [1, 2]}


def _drop_model_name(raw: dict) -> None:
    del raw["model"]["name"]


BAD = [  # (id, overrides, recipe edit, text the one line must contain)
    ("unknown-key", ["train.batchsize=4"], None, "unknown key 'train.batchsize'"),
    ("unknown-top-key", ["optimiser=adam"], None, "unknown key 'optimiser'"),
    ("wrong-type", ["train.batch_size=many"], None, "train.batch_size"),
    ("wrong-type-section", ["train=3"], None, "train"),
    ("out-of-range", ["train.lr=-1"], None, "train.lr"),
    ("missing-model-name", [], _drop_model_name, "missing required value 'model.name'"),
    ("precision-choice", ["model.precision=fp8"], None, "model.precision"),
    ("task-section-choice", ["classify.mode=half"], None, "classify.mode"),
    ("unknown-task", ["task=summarise"], None, "unknown task 'summarise'"),
    ("not-a-section", ["name.first=1"], None, "'name.first' goes inside 'name'"),
    ("not-key-value", ["train.lr"], None, "'train.lr' is not key=value"),
    ("bad-run-name", ["name=../escape"], None, "name"),
]


@pytest.mark.parametrize("command", ["train", "show"])
@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, command, case):
    _, overrides, edit, must = case
    recipe = _recipe(tmp_path)
    if edit is not None:
        raw = read_yaml(recipe)
        edit(raw)
        write_yaml(recipe, raw)
    argv = ["train", str(recipe)] if command == "train" else ["config", "show", str(recipe)]
    assert main(argv + overrides) == 2
    line = _one_error_line(capsys)
    assert must in line
    assert str(recipe) in line                                 # names the file
    assert not (tmp_path / "runs").exists()


def test_missing_and_malformed_recipe_files(tmp_path, capsys):
    assert main(["config", "show", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: recipe file not found" in _one_error_line(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: classify\nmodel:\n  name: [unclosed\n", encoding="utf-8")
    assert main(["train", str(bad)]) == 2
    line = _one_error_line(capsys)
    assert "bad.yaml" in line and "line 4" in line and "malformed YAML" in line
    listing = tmp_path / "list.yaml"
    listing.write_text("- task\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match="must be a YAML mapping"):
        read_yaml(listing)


def test_task_config_is_registered_subclass(tmp_path):
    cfg = load_config(_recipe(tmp_path), ["classify.unfreeze_last=2"])
    assert isinstance(cfg, ClassifyRun) and isinstance(cfg, RunConfig)
    assert cfg.classify.unfreeze_last == 2
    assert cfg.run_dir == tmp_path / "runs" / "r"
    with pytest.raises(Exception):  # assignments are validated too
        cfg.train.batch_size = 0


def test_existing_run_dir_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "keep.txt").write_text("mine")
    assert main(["train", str(recipe)]) == 2
    line = _one_error_line(capsys)
    assert "run directory exists" in line and "resume=true" in line
    assert sorted(p.name for p in run_dir.iterdir()) == ["keep.txt"]


def test_resolved_config_is_saved_in_the_run_dir_and_round_trips(tmp_path, tiny_bert_dir, capsys):
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(24))
    recipe = _recipe(tmp_path, model=str(tiny_bert_dir))
    overrides = ["train.max_steps=2", "train.lr=1e-3", "classify.mode=full", "data.eval_fraction=0.25",
                 "seed=7"]
    assert main(["train", str(recipe), *overrides]) == 0
    saved = tmp_path / "runs" / "r" / "config.yaml"
    cfg = build_config(read_yaml(saved), source=str(saved))
    assert cfg == load_config(recipe, overrides)
    assert cfg.train.lr == 1e-3 and cfg.seed == 7 and cfg.classify.mode == "full"
    assert dump_config(cfg) == saved.read_text(encoding="utf-8")
