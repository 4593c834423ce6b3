"""Run folders are data, never code: crafted skops heads, remote code named by a run's config."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lmforge.errors import LmforgeError

pytest.importorskip("skops")


def _exec_node(payload: str) -> dict:
    """A skops node that calls ``builtins.exec(payload)`` when the file is loaded."""
    text = {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode",
            "content": json.dumps(payload), "is_json": True, "__id__": 1}
    return {"__class__": "exec", "__module__": "builtins", "__loader__": "ConstructorFromReduceNode",
            "content": {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode",
                        "content": [text], "__id__": 2}, "__id__": 3}


def _tree_head(folder: Path):
    from lmforge.tasks.classify_heads import SklearnHead

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 3)), np.arange(30) % 2
    head = SklearnHead("sklearn.tree.DecisionTreeClassifier", {"max_depth": 2}, 2).fit(x, y)
    head.save(folder)
    return head, x


def _inject(file: Path, node: dict) -> None:
    with zipfile.ZipFile(file) as z:
        files = {n: z.read(n) for n in z.namelist()}
    schema = json.loads(files["schema.json"])
    schema["content"]["content"]["criterion"] = node
    files["schema.json"] = json.dumps(schema).encode()
    with zipfile.ZipFile(file, "w") as z:
        for n, b in files.items():
            z.writestr(n, b)


def test_the_exec_hole_is_real_in_skops_with_a_prefix_allowlist(tmp_path):
    """The old loader trusted every type under ``builtins.``: this is what it let through."""
    import skops.io as sio

    _tree_head(tmp_path / "h")
    marker = tmp_path / "ran"
    _inject(tmp_path / "h" / "classifier.skops", _exec_node(f"open({str(marker)!r}, 'w').write('x')"))
    untrusted = sio.get_untrusted_types(file=tmp_path / "h" / "classifier.skops")
    assert "builtins.exec" in untrusted
    prefix_trusted = [t for t in untrusted if t.startswith(("sklearn.", "numpy.", "builtins.", "scipy."))]
    sio.load(tmp_path / "h" / "classifier.skops", trusted=prefix_trusted)
    assert marker.exists()                                   # the payload ran


def test_a_crafted_skops_head_is_refused_before_anything_runs(tmp_path):
    from lmforge.tasks.classify_heads import SklearnHead

    _tree_head(tmp_path / "h")
    marker = tmp_path / "ran"
    _inject(tmp_path / "h" / "classifier.skops", _exec_node(f"open({str(marker)!r}, 'w').write('x')"))
    with pytest.raises(LmforgeError, match=r"classifier.skops: refusing to load type builtins.exec"):
        SklearnHead.load(tmp_path / "h", 2)
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("os", "system"), ("subprocess", "call"), ("builtins", "eval"),
                                         ("sklearn.utils", "_print_elapsed_time")])
def test_other_callables_are_refused_too(tmp_path, module, name):
    from lmforge.tasks.classify_heads import SklearnHead

    _tree_head(tmp_path / "h")
    node = _exec_node("1")
    node["__module__"], node["__class__"] = module, name
    _inject(tmp_path / "h" / "classifier.skops", node)
    with pytest.raises(LmforgeError, match=f"refusing to load type {module}.{name}"):
        SklearnHead.load(tmp_path / "h", 2)


@pytest.mark.parametrize("classifier,kwargs", [
    ("sklearn.tree.DecisionTreeClassifier", {"max_depth": 3}),
    ("sklearn.ensemble.RandomForestClassifier", {"n_estimators": 3}),
    ("sklearn.neighbors.KNeighborsClassifier", {"n_neighbors": 3, "algorithm": "kd_tree"}),
    ("sklearn.neighbors.KNeighborsClassifier", {"n_neighbors": 3, "algorithm": "ball_tree"}),
    ("sklearn.neural_network.MLPClassifier", {"max_iter": 5, "hidden_layer_sizes": (4,)}),
    ("sklearn.ensemble.HistGradientBoostingClassifier", {"max_iter": 3}),
    ("sklearn.naive_bayes.GaussianNB", {}),
])
def test_genuine_heads_still_round_trip(tmp_path, classifier, kwargs):
    import warnings

    from lmforge.tasks.classify_heads import SklearnHead

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), np.arange(40) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = SklearnHead(classifier, kwargs, 3).fit(x, y)
    head.save(tmp_path / "h")
    np.testing.assert_allclose(SklearnHead.load(tmp_path / "h", 3).probs(x), head.probs(x))


def test_a_head_of_another_class_than_head_json_is_refused(tmp_path):
    from lmforge.tasks.classify_heads import SklearnHead

    _tree_head(tmp_path / "h")
    meta = json.loads((tmp_path / "h" / "head.json").read_text())
    (tmp_path / "h" / "head.json").write_text(json.dumps(meta | {"classifier": "sklearn.naive_bayes.GaussianNB",
                                                                "kwargs": {}}))
    with pytest.raises(LmforgeError, match="holds a DecisionTreeClassifier"):
        SklearnHead.load(tmp_path / "h", 2)
    (tmp_path / "h" / "head.json").write_text("{broken")
    with pytest.raises(LmforgeError, match="head.json: malformed head file"):
        SklearnHead.load(tmp_path / "h", 2)


# ---- remote code runs only when the command line asks for it ------------------------------------------------
def _remote_code_model(src: Path, dst: Path, marker: Path) -> Path:
    import shutil

    m = Path(shutil.copytree(src, dst))
    cfg = json.loads((m / "config.json").read_text())
    cfg |= {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}
    (m / "config.json").write_text(json.dumps(cfg))
    (m / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig, BertModel\n"
        "class EvilConfig(BertConfig):\n    model_type = 'evil'\n"
        "class EvilModel(BertModel):\n    config_class = EvilConfig\n")
    return m


def test_remote_code_runs_only_with_the_command_flag(tmp_path, tiny_bert_dir, capsys):
    from lmforge.cli import main

    marker = tmp_path / "ran"
    m = _remote_code_model(tiny_bert_dir, tmp_path / "m", marker)
    (tmp_path / "x.txt").write_text("good movie\nbad plot\n")
    argv = ["embed", str(m), "--input", str(tmp_path / "x.txt"), "--out", str(tmp_path / "v.npy"), "--no-progress"]
    assert main(argv) == 2
    assert "pass --trust-remote-code" in capsys.readouterr().err and not marker.exists()
    assert main(argv + ["--trust-remote-code"]) == 0                 # the user's explicit choice
    assert marker.exists() and (tmp_path / "v.npy").is_file()


def test_the_flag_is_offered_where_saved_runs_load_and_not_for_own_recipes():
    from lmforge.cli import OWN_RECIPES, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        has = any("--trust-remote-code" in a.option_strings for a in parser._actions)
        assert has == (name not in OWN_RECIPES), name
    assert {"eval", "predict", "merge", "generate", "embed", "chat", "fill-mask", "score"} <= set(sub.choices)


def test_the_python_api_treats_a_loaded_run_as_data(tmp_path, tiny_bert_dir):
    import yaml
    from conftest import sentiment_rows, write_jsonl, write_yaml

    from lmforge import api
    from lmforge.cli import main

    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(24))
    recipe = write_yaml(tmp_path / "r.yaml", {
        "task": "classify", "name": "r", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval_fraction": 0.25},
        "train": {"max_steps": 1, "batch_size": 8, "progress": False}})
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "runs" / "r"
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["model"]["trust_remote_code"] = True                       # as a downloaded run might say
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(LmforgeError, match="trust_remote_code=true is not obeyed"):
        api.load(run)
    loaded = api.load(run, trust_remote_code=True)                 # the caller's explicit choice
    assert loaded.config.model.trust_remote_code is True
    assert loaded.task.cfg.model.trust_remote_code is True
