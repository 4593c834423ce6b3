"""The Python API (``import lmforge``): the README's Python section runs; a toy task is one file + one line."""
from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import sentiment_rows, write_jsonl, write_yaml

import lmforge
from lmforge.config import TASK_CONFIGS
from lmforge.errors import LmforgeError
from lmforge.tasks import TASKS, task_class

README = Path(__file__).resolve().parents[1] / "README.md"


def test_import_lmforge_is_light():
    code = "import sys, lmforge; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(lmforge.train) and callable(lmforge.load) and callable(lmforge.encode)


def _python_section() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    assert 6 <= len(blocks[0].strip().splitlines()) <= 14          # about ten lines
    return blocks[0]


def test_the_readme_python_section_runs(tmp_path, monkeypatch, tiny_bert_dir, tiny_llama_dir, capsys):
    """The block as written, on tiny models: the recipe path and file names are the README's."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(32, seed=3))
    write_jsonl(tmp_path / "held_out.jsonl", sentiment_rows(12, seed=4))
    (tmp_path / "recipes").mkdir()
    write_yaml(tmp_path / "recipes" / "demo_rt_lora.yaml", {
        "task": "classify", "name": "demo", "overwrite": True, "seed": 1,
        "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
        "data": {"train": "train.jsonl", "eval": "held_out.jsonl"},
        "classify": {"mode": "lora"}, "lora": {"target_modules": ["query", "value"]},
        "train": {"batch_size": 8, "lr": 5e-3, "eval_every": 10, "best_metric": "accuracy", "progress": False}})
    code = _python_section().replace('"minilm"', repr(str(tiny_bert_dir))).replace('"smollm2"',
                                                                                   repr(str(tiny_llama_dir)))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    run, best, vectors = scope["run"], scope["best"], scope["vectors"]
    assert run.run_dir == Path("runs/rt-python") and (run.run_dir / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run.run_dir / "eval.json").read_text())["step"] == 40
    assert best.checkpoint == "best" and (run.run_dir / "eval_held_out.json").is_file()
    assert vectors.shape == (2, 32) and vectors.dtype == np.float32
    pred = run.predict(["good great"])[0]
    assert pred["label"] in ("neg", "pos") and abs(sum(pred["probs"].values()) - 1) < 1e-4
    assert best.task.labels == run.task.labels


def test_overrides_as_keywords_and_dotted_keys(tmp_path, tiny_bert_dir):
    recipe = {"task": "classify", "model": {"name": str(tiny_bert_dir)}, "data": {"train": "x.jsonl"}}
    cfg = lmforge.api.config(recipe, name="a", train={"max_steps": 3}, **{"data.max_length": 32})
    assert (cfg.name, cfg.train.max_steps, cfg.data.max_length, cfg.train.batch_size) == ("a", 3, 32, 16)
    with pytest.raises(LmforgeError, match="unknown key 'train.steps'"):
        lmforge.api.config(recipe, train={"steps": 3})
    with pytest.raises(LmforgeError, match="no texts"):
        lmforge.encode(str(tiny_bert_dir), [])


# ---------------------------------------------------------------- one task registry
@pytest.fixture
def toy():
    module = importlib.import_module("_toy_task")
    yield module
    TASKS.pop("toy", None)
    TASK_CONFIGS.pop("toy", None)
    sys.modules.pop("_toy_task", None)


def test_a_toy_task_is_one_file_and_one_registration_line(tmp_path, toy):
    assert Path(toy.__file__).read_text().count("@register_task(") == 1
    assert task_class("toy") is toy.ToyTask and TASK_CONFIGS["toy"] is toy.ToyRun
    write_jsonl(tmp_path / "xy.jsonl", [{"x": i / 8, "y": 3 * i / 8 + 1} for i in range(16)])
    recipe = write_yaml(tmp_path / "toy.yaml", {
        "task": "toy", "output_dir": str(tmp_path / "runs"), "name": "t", "model": {"name": "none"},
        "data": {"train": str(tmp_path / "xy.jsonl")}, "toy": {"init": 0.5},
        "train": {"max_steps": 200, "batch_size": 16, "lr": 0.3, "schedule": "constant", "max_grad_norm": None,
                  "progress": False}})
    run = lmforge.train(recipe)                          # the engine, the run directory, the artefact
    assert run.metrics["mse"] < 0.05
    again = lmforge.load(run.run_dir)                   # the typed config comes back as ToyRun
    assert isinstance(again.config, toy.ToyRun) and again.config.toy.init == 0.5
    assert again.predict(["1.0"])[0]["y"] == pytest.approx(4.0, abs=0.4)
    with pytest.raises(LmforgeError, match="unknown key 'toy.slope'"):
        lmforge.api.config(recipe, toy={"slope": 2})


def test_every_recipe_names_a_registered_task():
    import yaml

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))
    tasks = {yaml.safe_load(p.read_text()).get("task") for p in recipes}
    tasks.discard(None)                                  # compare recipes name their base's task
    assert tasks and tasks <= set(TASKS), sorted(tasks - set(TASKS))
    from lmforge.tasks import TASK_MODULES

    assert set(TASK_MODULES) <= set(TASKS), f"listed but not registered: {sorted(set(TASK_MODULES) - set(TASKS))}"
    ours = {n for n, cls in TASKS.items() if cls.__module__.startswith("lmforge.")}   # not test toys
    ours_cfg = {n for n, cls in TASK_CONFIGS.items() if cls.__module__.startswith("lmforge.")}
    assert ours_cfg == ours, f"config sections without a task: {sorted(ours_cfg - ours)}"
    for name, cls in TASKS.items():
        if not cls.__module__.startswith("lmforge."):
            continue                                     # a toy task a test module registered
        assert TASK_CONFIGS[name] is cls.config_class
        section = cls.config_class.model_fields.get(name)
        assert section is not None or name in ("retriever",), f"task {name} has no '{name}:' section"


def test_the_engine_logs_the_pre_clip_gradient_norm(tmp_path, toy):
    import json
    import math

    xs = [i / 8 for i in range(16)]
    write_jsonl(tmp_path / "xy.jsonl", [{"x": x, "y": 3 * x + 1} for x in xs])
    run = lmforge.train({
        "task": "toy", "output_dir": str(tmp_path / "runs"), "name": "g", "model": {"name": "none"},
        "data": {"train": str(tmp_path / "xy.jsonl"), "eval_fraction": 0.0}, "toy": {"init": 0.5},
        "train": {"max_steps": 1, "batch_size": 16, "lr": 0.1, "max_grad_norm": 0.01, "log_every": 1,
                  "progress": False}})
    rec = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()
           if '"train"' in line][0]
    # MSE of w x + b against 3 x + 1 at w = 0.5, b = 0: dL/dw = mean(2 r x), dL/db = mean(2 r), r = w x + b - y
    r = [0.5 * x - (3 * x + 1) for x in xs]
    gw = sum(2 * ri * x for ri, x in zip(r, xs)) / 16
    gb = sum(2 * ri for ri in r) / 16
    assert rec["grad_norm"] == pytest.approx(math.hypot(gw, gb), rel=1e-5)  # before clipping to 0.01
