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
    assert shown["classify"]["mode"] == "frozen" and shown["classify"]["unfreeze_last"] == 0
    assert shown["data"]["columns"] == {"text": "sentence"}
    assert shown["data"]["labels"] == ["neg", "pos"]
    assert shown["adapter"]["target_modules"] == "q_proj"  # the deprecated lora: section is read as adapter:
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
    if overrides:                                              # names the override, not the recipe
        assert f"override '{overrides[0]}" in line
    else:
        assert str(recipe) in line                             # names the file
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


# ---- trust: YAML bombs, duplicate keys, previews, non-finite numbers, remote code -----------------------------
def test_duplicate_keys_are_errors_naming_both_lines(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("task: classify\nmodel:\n  name: a\n  precision: fp32\n  name: b\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"dup.yaml: line 5 malformed YAML: duplicate key 'name' \(first at line 3\)"):
        read_yaml(p)


def test_merge_keys_still_override():
    from lmforge.config import load_yaml_text

    assert load_yaml_text("d: &d {a: 1, b: 2}\nx:\n  <<: *d\n  a: 3\n", "s")["x"] == {"a": 3, "b": 2}


def test_alias_bomb_is_refused_quickly_in_one_short_line(tmp_path):
    import time

    layers = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    p = tmp_path / "bomb.yaml"
    p.write_text(layers + "task: *i\n", encoding="utf-8")
    t0 = time.perf_counter()
    with pytest.raises(LmforgeError, match="alias") as exc:
        read_yaml(p)
    assert time.perf_counter() - t0 < 2 and len(str(exc.value)) < 300
    small = tmp_path / "ok.yaml"  # anchors used as intended stay fine
    small.write_text("base: &b {lr: 0.1}\ntrain: *b\ntask: classify\n", encoding="utf-8")
    assert read_yaml(small)["train"] == {"lr": 0.1}


def test_non_utf8_recipe_names_file_and_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"task: classify\n\xef\xbb\xbfname: ok\nx: \xff\n")
    with pytest.raises(LmforgeError, match=r"r.yaml line 3: not UTF-8 text"):
        read_yaml(p)
    p.write_bytes(b"\xef\xbb\xbftask: classify\n")  # a BOM is fine
    assert read_yaml(p) == {"task": "classify"}


@pytest.mark.parametrize("override,key", [("train.epochs=.inf", "train.epochs"), ("train.lr=.inf", "train.lr"),
                                          ("train.lr=.nan", "train.lr"), ("lora.alpha=-.inf", "lora.alpha"),
                                          ("train.max_grad_norm=.inf", "train.max_grad_norm")])
def test_non_finite_numbers_are_refused(tmp_path, override, key):
    with pytest.raises(LmforgeError, match=rf"override '{override}': {key}: Input should be a finite number"):
        load_config(_recipe(tmp_path), [override])


@pytest.mark.parametrize("value", [["classify", "ner"], {"classify": 1}, 3])
def test_task_must_be_one_name(tmp_path, value):
    with pytest.raises(LmforgeError, match="task: must be one task name"):
        build_config({"task": value, "model": {"name": "x"}}, source="r.yaml")


def test_error_messages_cut_long_values(tmp_path):
    long = "v" * 100_000
    for override in (f"train.batch_size={long}", f"task={long}", f"model.precision={long}", f"{long}=1",
                     f"train.{long}=1"):
        with pytest.raises(LmforgeError) as exc:
            load_config(_recipe(tmp_path), [override])
        assert len(str(exc.value)) < 400 and "characters)" in str(exc.value)


@pytest.mark.parametrize("name", ["../x", "..", "/abs/path", "a/b", "a\\b", ".hidden", ""])
def test_run_and_compare_names_are_plain(tmp_path, name):
    from lmforge.compare import read_compare

    with pytest.raises(LmforgeError, match="name"):
        load_config(_recipe(tmp_path), [f"name={name}"] if name else ["name=''"])
    p = write_yaml(tmp_path / "c.yaml", {"name": name, "base": {"task": "classify"}, "methods": {"a": {}}})
    with pytest.raises(LmforgeError, match="name"):
        read_compare(p)


@pytest.mark.parametrize("device,ok", [("cpu", True), ("cuda:1", True), ("auto", True), ("tpu", False),
                                       ("cuda:x", False), ("cpu; rm", False)])
def test_device_strings_are_checked_in_the_config(tmp_path, device, ok):
    if ok:
        assert load_config(_recipe(tmp_path), [f"model.device={device}"]).model.device == device
    else:
        with pytest.raises(LmforgeError, match=r"model.device: .*unknown device"):
            load_config(_recipe(tmp_path), [f"model.device={device}"])


def test_saved_run_configs_do_not_turn_on_remote_code(tmp_path):
    from lmforge.config import loading_saved_runs

    raw = {"task": "classify", "model": {"name": "x", "trust_remote_code": True}}
    assert build_config(raw).model.trust_remote_code is True          # a recipe the user runs
    with loading_saved_runs(False):
        with pytest.raises(LmforgeError, match="pass --trust-remote-code"):
            build_config(raw, source="run/config.yaml")
        assert build_config(raw | {"model": {"name": "x"}}).model.trust_remote_code is False
    with loading_saved_runs(True):                                     # only the command's flag enables it
        assert build_config(raw | {"model": {"name": "x"}}).model.trust_remote_code is True
    assert build_config(raw | {"model": {"name": "x"}}).model.trust_remote_code is False
