"""Every bad input through the real CLI: one line, the right exit code, nothing half-written.

Each case builds its input in a fresh folder, runs ``lmforge.cli.main([...])`` in this process and
checks: the exit code (2 for bad input, 1 for a run stopped by the environment), exactly one
``lmforge: error:`` line on stderr holding the expected substring and no longer than
``MAX_LINE`` characters, no ``.tmp`` leftovers, no 0-byte files and (for ``train``) no run
directory. A Python exception escaping ``main`` is a traceback: the test fails on it.

Run as a script (``python tests/test_bad_inputs.py``) it prints the tally the issue asks for:
inputs tried, clear lines, tracebacks, wrongly accepted.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_bert, make_tiny_llama, sentiment_rows, write_jsonl, write_yaml  # noqa: E402

from lmforge.cli import main  # noqa: E402

MAX_LINE = 400


# ---- the world the cases share (built once: tiny models, data, one trained run of each kind) --------------
class World:
    def __init__(self, root: Path):
        self.root = root
        self.bert = make_tiny_bert(root / "bert")
        self.llama = make_tiny_llama(root / "llama")
        self.train = write_jsonl(root / "train.jsonl", sentiment_rows(48, 1))
        self.texts = root / "texts.txt"
        self.texts.write_text("good great movie\nawful boring plot\n", encoding="utf-8")
        self.predict_in = write_jsonl(root / "in.jsonl", [{"text": "good movie"}, {"text": "bad plot"}])
        self.clf = self._train("clf", {})
        self.elr = self._train("elr", {"classify": {"method": "embedding_lr", "embedding_lr": {
            "classifier": "sklearn.tree.DecisionTreeClassifier", "kwargs": {"max_depth": 2}}}})
        sft_data = write_jsonl(root / "sft.jsonl", [{"prompt": r["text"], "completion": r["label"]}
                                                    for r in sentiment_rows(16, 2)])
        self.sft = self._train("sft", {"task": "sft", "model": {"name": str(self.llama)}, "data": {"train": str(sft_data)}})

    def recipe_dict(self, out: Path, **top) -> dict:
        raw = {"task": "classify", "name": "r", "output_dir": str(out / "runs"),
               "model": {"name": str(self.bert), "precision": "fp32", "device": "cpu"},
               "data": {"train": str(self.train), "eval_fraction": 0.25, "max_length": 32},
               "train": {"max_steps": 1, "batch_size": 8, "progress": False}}
        for k, v in top.items():
            raw[k] = raw[k] | v if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
        return raw

    def recipe(self, out: Path, **top) -> str:
        return str(write_yaml(out / "recipe.yaml", self.recipe_dict(out, **top)))

    def _train(self, name: str, top: dict) -> Path:
        recipe = write_yaml(self.root / f"{name}.yaml", self.recipe_dict(self.root, name=name, **top))
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["train", str(recipe)]) == 0
        return self.root / "runs" / name

    def copy_run(self, run: Path, out: Path) -> Path:
        dst = out / run.name
        shutil.copytree(run, dst)
        return dst

    def model_copy(self, out: Path, which: str = "bert") -> Path:
        dst = out / f"{which}_copy"
        shutil.copytree(getattr(self, which), dst)
        return dst


def _write(path: Path, data: bytes | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def _edit_config(run: Path, fn) -> None:
    raw = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    fn(raw)
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


# ---- building blocks of the cases --------------------------------------------------------------------------
def train_with(**top):
    return lambda w, t: ["train", w.recipe(t, **top)]


def train_override(*overrides):
    return lambda w, t: ["train", w.recipe(t), *overrides]


def train_recipe_text(text: bytes | str):
    return lambda w, t: ["train", _write(t / "recipe.yaml", text)]


def train_data(name: str, data: bytes | str):
    return lambda w, t: ["train", w.recipe(t, data={"train": _write(t / name, data)})]


def train_model(mutate: Callable[[Path], None]):
    def make(w, t):
        m = w.model_copy(t)
        mutate(m)
        return ["train", w.recipe(t, model={"name": str(m)})]
    return make


def _truncate(f: str, keep: int | None = None):
    def mutate(m: Path):
        b = (m / f).read_bytes()
        (m / f).write_bytes(b[: keep if keep is not None else len(b) // 2])
    return mutate


def _garbage_weights(m: Path):
    (m / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))


def _no_weights(m: Path):
    (m / "model.safetensors").unlink()


def _pickled_weights(m: Path):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(m / "model.safetensors"), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()


def _config_json(text: str):
    return lambda m: (m / "config.json").write_text(text, encoding="utf-8")


def _unknown_model_type(m: Path):
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "no_such_architecture"
    (m / "config.json").write_text(json.dumps(cfg))


def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def run_cmd(cmd: str, run: str, mutate: Callable[[Path], None] | None = None, *extra: str, out: str = "out.jsonl"):
    """``lmforge <cmd> RUN`` on a copy of a trained run (``mutate`` breaks it first)."""
    def make(w, t):
        r = w.copy_run(getattr(w, run), t)
        if mutate is not None:
            mutate(r)
        if cmd == "predict":
            return ["predict", str(r), "--input", str(w.predict_in), "--out", str(t / out), *extra]
        if cmd == "eval":
            return ["eval", str(r), "--data", str(w.train), *extra]
        return [cmd, str(r), *extra]
    return make


def _bytes_in_config(r: Path):
    (r / "config.yaml").write_bytes((r / "config.yaml").read_bytes().replace(b"name: clf", b"name: cl\xff"))


def _rm(rel: str):
    return lambda r: (r / rel).unlink()


def _put(rel: str, text: str):
    return lambda r: (r / rel).write_text(text, encoding="utf-8")


# ---- remote code: a model folder whose config asks for code that writes a marker when imported ----------
MARKER = "REMOTE_CODE_RAN"


def _evil_model(w: World, t: Path) -> Path:
    m = w.model_copy(t)
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                       "AutoModelForSequenceClassification": "evil.EvilModel", "AutoModelForCausalLM": "evil.EvilModel"}
    cfg["model_type"] = "evil"
    (m / "config.json").write_text(json.dumps(cfg))
    (m / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(t / MARKER)!r}).write_text('ran')\n"
        "from transformers import BertConfig, BertModel\n"
        "class EvilConfig(BertConfig):\n    model_type = 'evil'\n"
        "class EvilModel(BertModel):\n    config_class = EvilConfig\n")
    return m


def remote_code_run(cmd: str, *extra: str):
    def make(w, t):
        r = w.copy_run(w.clf, t)
        m = _evil_model(w, t)
        _edit_config(r, lambda raw: raw["model"].update(name=str(m), trust_remote_code=True))
        if cmd == "predict":
            return ["predict", str(r), "--input", str(w.predict_in), "--out", str(t / "out.jsonl"), *extra]
        if cmd == "eval":
            return ["eval", str(r), "--data", str(w.train), *extra]
        if cmd == "merge":
            return ["merge", str(r), "--out", str(t / "merged"), *extra]
        if cmd == "embed":
            return ["embed", str(r), "--input", str(w.texts), "--out", str(t / "v.npy"), *extra]
        return [cmd, str(r), "--prompt", "hi", "--max-new-tokens", "2", *extra]
    return make


def no_marker(w, t) -> str | None:
    return "the remote code ran" if (t / MARKER).exists() else None


# ---- a crafted .skops whose node calls builtins.exec ---------------------------------------------------------
PWNED = "SKOPS_PAYLOAD_RAN"


def _evil_skops(t: Path):
    def mutate(r: Path):
        f = r / "head" / "classifier.skops"
        with zipfile.ZipFile(f) as z:
            files = {n: z.read(n) for n in z.namelist()}
        schema = json.loads(files["schema.json"])
        payload = f"open({str(t / PWNED)!r}, 'w').write('x')"
        text = {"__class__": "str", "__module__": "builtins", "__loader__": "JsonNode",
                "content": json.dumps(payload), "is_json": True, "__id__": 1}
        schema["content"]["content"]["criterion"] = {
            "__class__": "exec", "__module__": "builtins", "__loader__": "ConstructorFromReduceNode",
            "content": {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode",
                        "content": [text], "__id__": 2}, "__id__": 3}
        files["schema.json"] = json.dumps(schema).encode()
        with zipfile.ZipFile(f, "w") as z:
            for n, b in files.items():
                z.writestr(n, b)
    return mutate


def skops_case(cmd: str):
    def make(w, t):
        return run_cmd(cmd, "elr", _evil_skops(t))(w, t)
    return make


def no_payload(w, t) -> str | None:
    return "the .skops payload ran" if (t / PWNED).exists() else None


# ---- YAML bombs and long values ------------------------------------------------------------------------------
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) + "task: *i\n"
LONG = "v" * 20000


# ---- the cases -------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    make: Callable[[World, Path], list[str]]
    code: int
    needle: str
    check: Callable[[World, Path], str | None] | None = None


CASES = [
    # 1. security
    Case("skops_exec_predict", skops_case("predict"), 2, "classifier.skops", no_payload),
    Case("skops_exec_eval", skops_case("eval"), 2, "classifier.skops", no_payload),
    Case("remote_code_from_run_predict", remote_code_run("predict"), 2, "--trust-remote-code", no_marker),
    Case("remote_code_from_run_eval", remote_code_run("eval"), 2, "--trust-remote-code", no_marker),
    Case("remote_code_from_run_merge", remote_code_run("merge"), 2, "--trust-remote-code", no_marker),
    Case("remote_code_from_run_generate", remote_code_run("generate"), 2, "--trust-remote-code", no_marker),
    Case("remote_code_from_run_embed", remote_code_run("embed"), 2, "--trust-remote-code", no_marker),
    Case("train_name_dotdot", train_override("name=../escape"), 2, "name"),
    Case("train_name_absolute", train_override("name=/tmp/abs"), 2, "name"),
    Case("compare_name_dotdot", lambda w, t: ["compare", _write(t / "c.yaml", yaml.safe_dump(
        {"name": "../escape", "output_dir": str(t / "runs"), "base": w.recipe_dict(t),
         "methods": {"a": {}}}))], 2, "name"),
    Case("compare_name_absolute", lambda w, t: ["compare", _write(t / "c.yaml", yaml.safe_dump(
        {"name": str(t / "abs"), "output_dir": str(t / "runs"), "base": w.recipe_dict(t),
         "methods": {"a": {}}}))], 2, "name"),
    Case("yaml_alias_bomb", train_recipe_text(ALIAS_BOMB), 2, "alias"),
    Case("long_value_is_cut", train_override(f"train.batch_size={LONG}"), 2, "train.batch_size"),
    Case("long_model_name_is_cut", train_override(f"model.name=./{LONG}"), 2, "not found"),
    Case("long_task_name_is_cut", train_override(f"task={LONG}"), 2, "task"),
    # 3. one line, exit 2: text encodings
    Case("recipe_not_utf8", train_recipe_text(b"task: classify\nname: r\xff\n"), 2, "UTF-8"),
    Case("data_jsonl_not_utf8", train_data("d.jsonl", b'{"text": "good \xff", "label": "pos"}\n'), 2, "UTF-8"),
    Case("data_csv_not_utf8", train_data("d.csv", b"text,label\ngood \xff movie,pos\nbad,neg\n"), 2, "UTF-8"),
    Case("data_txt_not_utf8", lambda w, t: ["embed", str(w.bert), "--input", _write(t / "x.txt", b"ok\nbad \xff\n"),
                                            "--out", str(t / "v.npy")], 2, "UTF-8"),
    Case("predict_input_not_utf8", lambda w, t: ["predict", str(w.clf), "--input", _write(
        t / "in.jsonl", b'{"text": "\xff"}\n'), "--out", str(t / "o.jsonl")], 2, "UTF-8"),
    Case("run_config_not_utf8", run_cmd("predict", "clf", _bytes_in_config), 2, "UTF-8"),
    Case("data_csv_gz_truncated", train_data("d.csv.gz", _gz(b"text,label\n" + b"good movie,pos\n" * 400)[:60]),
         2, "d.csv.gz"),
    # model files
    Case("weights_truncated", train_model(_truncate("model.safetensors")), 2, "model.safetensors"),
    Case("weights_header_truncated", train_model(_truncate("model.safetensors", 5)), 2, "model.safetensors"),
    Case("weights_garbage", train_model(_garbage_weights), 2, "model.safetensors"),
    Case("weights_missing", train_model(_no_weights), 2, "no weights"),
    Case("weights_pickled", train_model(_pickled_weights), 2, "pickle"),
    Case("config_json_malformed", train_model(_config_json("{not json")), 2, "config.json"),
    Case("config_json_not_a_mapping", train_model(_config_json("[1, 2]")), 2, "config.json"),
    Case("model_type_unknown", train_model(_unknown_model_type), 2, "model_type"),
    Case("gguf_not_gguf", lambda w, t: ["train", w.recipe(t, model={"name": _write(t / "m.gguf", b"not a gguf" * 10)})],
         2, "GGUF"),
    Case("weights_truncated_generate", lambda w, t: ["generate", str((lambda m: (_truncate("model.safetensors")(m), m)[1])(
        w.model_copy(t, "llama"))), "--prompt", "hi"], 2, "model.safetensors"),
    Case("weights_truncated_embed", lambda w, t: ["embed", str((lambda m: (_truncate("model.safetensors")(m), m)[1])(
        w.model_copy(t))), "--input", str(w.texts), "--out", str(t / "v.npy")], 2, "model.safetensors"),
    # incomplete runs
    Case("labels_json_missing", run_cmd("predict", "clf", _rm("labels.json")), 2, "labels.json"),
    Case("labels_json_malformed", run_cmd("predict", "clf", _put("labels.json", "[neg, pos")), 2, "labels.json"),
    Case("labels_json_not_a_list", run_cmd("predict", "clf", _put("labels.json", '{"a": 1}')), 2, "labels.json"),
    Case("predict_out_is_a_folder", lambda w, t: ["predict", str(w.clf), "--input", str(w.predict_in),
                                                  "--out", str(t)], 2, "folder"),
    Case("eval_out_is_a_folder", lambda w, t: ["eval", str(w.clf), "--data", str(w.train), "--out", str(t)],
         2, "folder"),
    Case("embed_out_is_a_folder", lambda w, t: ["embed", str(w.bert), "--input", str(w.texts),
                                                "--out", str((t / "d.npy").mkdir() or t / "d.npy")], 2, "folder"),
    Case("predict_on_an_sft_run", lambda w, t: ["predict", str(w.sft), "--input", str(w.predict_in),
                                                "--out", str(t / "o.jsonl")], 2, "lmforge generate RUN_DIR"),
    Case("predict_on_a_task_without_prediction", run_cmd(
        "predict", "clf", lambda r: _edit_config(r, lambda raw: (raw.update(task="mlm"), raw.pop("classify")))),
         2, "no trained model"),
    # config values
    Case("task_is_a_list", lambda w, t: ["train", _write(t / "r.yaml", yaml.safe_dump(
        w.recipe_dict(t, task=["classify", "ner"])))], 2, "task"),
    Case("task_is_a_mapping", lambda w, t: ["train", _write(t / "r.yaml", yaml.safe_dump(
        w.recipe_dict(t, task={"classify": 1})))], 2, "task"),
    Case("epochs_inf", train_override("train.epochs=.inf", "train.max_steps=null"), 2, "train.epochs"),
    Case("lr_inf", train_override("train.lr=.inf"), 2, "train.lr"),
    Case("lr_nan", train_override("train.lr=.nan"), 2, "train.lr"),
    Case("max_length_beyond_positions", train_override("data.max_length=100000"), 2, "data.max_length"),
    Case("device_unknown", train_override("model.device=tpu"), 2, "model.device"),
    Case("device_cuda_missing", train_override("model.device=cuda:3"), 2, "cuda"),
    Case("best_metric_unknown", train_override("train.best_metric=acuracy"), 2, "train.best_metric"),
    Case("duplicate_yaml_key", train_recipe_text(
        "task: classify\nmodel: {name: x}\ntrain: {lr: 0.1}\ntrain: {lr: 0.2}\n"), 2, "duplicate key 'train'"),
    Case("duplicate_nested_yaml_key", train_recipe_text(
        "task: classify\nmodel:\n  name: x\n  name: y\n"), 2, "duplicate key 'name'"),
    Case("override_error_names_the_override", train_override("train.batch_size=x"), 2, "train.batch_size=x"),
    Case("override_into_a_value", train_override("train.lr.x=1"), 2, "train.lr.x=1"),
    Case("override_not_key_value", train_override("train.lr"), 2, "key=value"),
    Case("embed_batch_size_0", lambda w, t: ["embed", str(w.bert), "--input", str(w.texts), "--out", str(t / "v.npy"),
                                             "--batch-size", "0"], 2, "--batch-size"),
    Case("embed_max_length_0", lambda w, t: ["embed", str(w.bert), "--input", str(w.texts), "--out", str(t / "v.npy"),
                                             "--max-length", "0"], 2, "--max-length"),
    Case("fill_mask_on_causal", lambda w, t: ["fill-mask", str(w.llama), "a [MASK] movie"], 2, "mask"),
    Case("generate_on_encoder", lambda w, t: ["generate", str(w.bert), "--prompt", "hi"], 2, "causal"),
    Case("generate_device_unknown", lambda w, t: ["generate", str(w.llama), "--prompt", "hi", "--device", "tpu"],
         2, "unknown device 'tpu'"),
    # positive cases: accepted, and what they produced
    Case("bom_jsonl_is_accepted", train_data("bom.jsonl", "\ufeff" + "".join(
        json.dumps(r) + "\n" for r in sentiment_rows(24, 3))), 0, ""),
]


def _rows_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = sentiment_rows(24, 3)


def _generate(*extra: str):
    return lambda w, t: ["generate", str(w.llama), "--prompt", "hi", "--max-new-tokens", "2", *extra]


def _no_tokenizer(m: Path):
    for f in m.glob("tokenizer*"):
        f.unlink()
    (m / "special_tokens_map.json").unlink(missing_ok=True)


def _adapter_file(mutate):
    def edit(r: Path):
        mutate(r / "adapter")
    return edit


MORE_CASES = [
    # recipes
    Case("recipe_missing", lambda w, t: ["train", str(t / "nope.yaml")], 2, "recipe file not found"),
    Case("recipe_is_a_folder", lambda w, t: ["train", str(t)], 2, "recipe"),
    Case("recipe_empty", train_recipe_text(""), 2, "task"),
    Case("recipe_is_a_list", train_recipe_text("- task: classify\n"), 2, "mapping"),
    Case("recipe_unclosed_bracket", train_recipe_text("task: classify\nmodel: {name: [x\n"), 2, "malformed YAML"),
    Case("recipe_tab_indent", train_recipe_text("task: classify\nmodel:\n\tname: x\n"), 2, "malformed YAML"),
    Case("recipe_nested_too_deep", train_recipe_text("task: " + "[" * 5000 + "]" * 5000 + "\n"), 2, "YAML"),
    Case("recipe_recursive_alias", train_recipe_text("a: &a [*a]\ntask: classify\n"), 2, "alias"),
    Case("recipe_binary_garbage", train_recipe_text(bytes(range(256)) * 4), 2, "recipe.yaml"),
    Case("unknown_top_key", train_override("optimiser=adam"), 2, "unknown key 'optimiser'"),
    Case("section_not_a_mapping", train_override("train=3"), 2, "train"),
    Case("batch_size_zero", train_override("train.batch_size=0"), 2, "train.batch_size"),
    Case("batch_size_float", train_override("train.batch_size=2.5"), 2, "train.batch_size"),
    Case("grad_accum_zero", train_override("train.grad_accum=0"), 2, "train.grad_accum"),
    Case("eval_fraction_above_one", train_override("data.eval_fraction=1.5"), 2, "data.eval_fraction"),
    Case("precision_unknown", train_override("model.precision=fp8"), 2, "model.precision"),
    Case("lora_rank_zero", train_override("lora.r=0"), 2, "r"),
    Case("name_backslash", train_override("name=a\\b"), 2, "name"),
    Case("name_empty", train_override("name=''"), 2, "name"),
    Case("task_unknown", train_override("task=summarise"), 2, "unknown task 'summarise'"),
    Case("override_empty_key_part", train_override("train..lr=1"), 2, "empty key"),
    Case("config_show_bad_override", lambda w, t: ["config", "show", w.recipe(t), "train.lr=abc"], 2, "train.lr=abc"),
    Case("max_train_samples_zero", train_override("data.max_train_samples=0"), 2, "data.max_train_samples"),
    # data files
    Case("data_missing", train_override("data.train=/nonexistent/x.jsonl"), 2, "data file not found"),
    Case("data_is_a_folder", lambda w, t: ["train", w.recipe(t, data={"train": str(t)})], 2, "folder"),
    Case("data_unsupported_ext", train_data("d.xlsx", b"PK\x03\x04"), 2, "unsupported data format"),
    Case("data_jsonl_gz", train_data("d.jsonl.gz", _gz(_rows_text(GOOD).encode())), 2, "compressed"),
    Case("data_malformed_json_line", train_data("d.jsonl", _rows_text(GOOD[:3]) + "{oops\n"), 2, "line 4"),
    Case("data_line_not_object", train_data("d.jsonl", _rows_text(GOOD[:3]) + "[1, 2]\n"), 2, "line 4"),
    Case("data_empty", train_data("d.jsonl", ""), 2, "d.jsonl"),
    Case("data_only_blank_lines", train_data("d.jsonl", "\n\n  \n"), 2, "d.jsonl"),
    Case("data_missing_label_column", train_data("d.jsonl", _rows_text([{"text": "x"}] * 8)), 2, "label"),
    Case("data_null_label", train_data("d.jsonl", _rows_text(GOOD[:8] + [{"text": "x", "label": None}])), 2, "label"),
    Case("data_text_is_a_number", train_data("d.jsonl", _rows_text(GOOD[:8] + [{"text": 5, "label": "pos"}])),
         2, "must be text"),
    Case("data_text_empty", train_data("d.jsonl", _rows_text(GOOD[:8] + [{"text": " ", "label": "pos"}])), 2, "empty"),
    Case("data_json_not_a_list", train_data("d.json", '{"a": 1, "b": 2}'), 2, "list of objects"),
    Case("data_csv_ragged", train_data("d.csv", "text,label\na,pos\nb,neg,extra,more\n"), 2, "d.csv"),
    Case("data_csv_header_only", train_data("d.csv", "text,label\n"), 2, "d.csv"),
    Case("data_csv_empty", train_data("d.csv", ""), 2, "d.csv"),
    Case("data_parquet_garbage", train_data("d.parquet", b"PAR1 garbage"), 2, "Parquet"),
    Case("data_tsv_not_utf8", train_data("d.tsv", b"text\tlabel\ngood \xff\tpos\n"), 2, "UTF-8"),
    Case("data_json_not_utf8", train_data("d.json", b'[{"text": "\xff", "label": "pos"}]'), 2, "UTF-8"),
    Case("data_eval_unknown_label", lambda w, t: ["train", w.recipe(t, data={"eval": _write(
        t / "ev.jsonl", _rows_text([{"text": "good", "label": "meh"}]))})], 2, "unknown label"),
    Case("data_labels_duplicate", train_override("data.labels=[pos, pos]"), 2, "duplicate"),
    Case("data_where_filters_all", train_override("data.where={label: [nothing]}"), 2, "empty split"),
    Case("data_columns_to_missing", train_override("data.columns={text: body}"), 2, "body"),
    Case("data_too_few_to_split", train_data("d.jsonl", _rows_text(GOOD[:1])), 2, "d.jsonl"),
    Case("data_hf_offline", train_override("data.train=hf:no_such_dataset_xyz@train"), 2, "hf:no_such_dataset_xyz"),
    Case("data_pkg_missing", train_override("data.train=pkg://no_such_pkg_xyz/a.jsonl"), 2, "no_such_pkg_xyz"),
    # models
    Case("model_path_missing", train_override("model.name=/nonexistent/model"), 2, "not found"),
    Case("model_hub_offline", train_override("model.name=someone/some-model"), 2, "someone/some-model"),
    Case("model_folder_no_config", train_model(lambda m: (m / "config.json").unlink()), 2, "config.json"),
    Case("model_no_tokenizer", train_model(_no_tokenizer), 2, "tokenizer"),
    Case("model_tokenizer_garbage", train_model(lambda m: (m / "tokenizer.json").write_text("{garbage")), 2,
         "tokenizer"),
    Case("model_config_not_utf8", train_model(lambda m: (m / "config.json").write_bytes(b'{"a": "\xff"}')),
         2, "UTF-8"),
    Case("model_index_missing_shard", train_model(lambda m: (m / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))), 2, "shard"),
    Case("model_two_ggufs", lambda w, t: ["train", w.recipe(t, model={"name": str(
        (_write(t / "g" / "a.gguf", b"GGUF"), _write(t / "g" / "b.gguf", b"GGUF"), t / "g")[2])})],
         2, "config.json"),
    Case("gguf_truncated", lambda w, t: ["train", w.recipe(t, model={"name": _write(t / "m.gguf", b"GGUF\x03\x00")})],
         2, "m.gguf"),
    # commands and runs
    Case("predict_input_missing", lambda w, t: ["predict", str(w.clf), "--input", str(t / "no.jsonl"),
                                                "--out", str(t / "o.jsonl")], 2, "not found"),
    Case("predict_input_no_text", lambda w, t: ["predict", str(w.clf), "--input", _write(
        t / "i.jsonl", '{"body": "x"}\n'), "--out", str(t / "o.jsonl")], 2, "text"),
    Case("predict_not_a_run", lambda w, t: ["predict", str(t), "--input", str(w.predict_in),
                                            "--out", str(t / "o.jsonl")], 2, "run"),
    Case("predict_run_missing_adapter", run_cmd("predict", "clf", lambda r: shutil.rmtree(r / "adapter")),
         2, "adapter"),
    Case("predict_adapter_truncated", run_cmd("predict", "clf", _adapter_file(_truncate("adapter_model.safetensors"))),
         2, "adapter"),
    Case("predict_adapter_config_malformed", run_cmd("predict", "clf", _adapter_file(
        lambda a: (a / "adapter_config.json").write_text("{nope"))), 2, "adapter_config.json"),
    Case("run_config_unknown_key", run_cmd("predict", "clf", lambda r: _edit_config(
        r, lambda raw: raw.update(surprise=1))), 2, "surprise"),
    Case("run_config_empty", run_cmd("predict", "clf", _put("config.yaml", "")), 2, "config.yaml"),
    Case("eval_data_missing", lambda w, t: ["eval", str(w.clf), "--data", str(t / "no.jsonl")], 2, "not found"),
    Case("eval_data_unknown_label", lambda w, t: ["eval", str(w.clf), "--data", _write(
        t / "e.jsonl", '{"text": "x", "label": "meh"}\n')], 2, "unknown label"),
    Case("generate_empty_prompt", lambda w, t: ["generate", str(w.llama), "--prompt", " "], 2, "empty"),
    Case("generate_input_without_out", lambda w, t: ["generate", str(w.llama), "--input", str(w.predict_in)],
         2, "--out"),
    Case("generate_max_new_tokens_zero", _generate("--max-new-tokens", "0"), 2, "max"),
    Case("generate_temperature_negative", _generate("--temperature", "-1"), 2, "temperature"),
    Case("generate_top_p_above_one", _generate("--top-p", "2"), 2, "top"),
    Case("generate_top_k_negative", _generate("--top-k", "-3"), 2, "top"),
    Case("generate_batch_size_zero", lambda w, t: ["generate", str(w.llama), "--input", _write(
        t / "p.jsonl", '{"prompt": "hi"}\n'), "--out", str(t / "g.jsonl"), "--batch-size", "0"], 2, "batch"),
    Case("generate_repetition_penalty_zero", _generate("--repetition-penalty", "0"), 2, "repetition"),
    Case("generate_input_no_prompt", lambda w, t: ["generate", str(w.llama), "--input", _write(
        t / "p.jsonl", '{"text": "hi"}\n'), "--out", str(t / "g.jsonl")], 2, "prompt"),
    Case("embed_out_bad_suffix", lambda w, t: ["embed", str(w.bert), "--input", str(w.texts),
                                               "--out", str(t / "v.csv")], 2, ".npy"),
    Case("embed_column_missing", lambda w, t: ["embed", str(w.bert), "--input", str(w.predict_in),
                                               "--out", str(t / "v.npy"), "--column", "body"], 2, "body"),
    Case("embed_txt_empty_line", lambda w, t: ["embed", str(w.bert), "--input", _write(t / "x.txt", "a\n\nb\n"),
                                               "--out", str(t / "v.npy")], 2, "line 2"),
    Case("embed_max_length_beyond_positions", lambda w, t: ["embed", str(w.bert), "--input", str(w.texts),
                                                            "--out", str(t / "v.npy"), "--max-length", "100000"],
         2, "max_length: 100000 is beyond"),
    Case("fill_mask_no_mask", lambda w, t: ["fill-mask", str(w.bert), "no mask here"], 2, "mask"),
    Case("fill_mask_top_k_zero", lambda w, t: ["fill-mask", str(w.bert), "a [MASK]", "--top-k", "0"], 2, "top-k"),
    Case("merge_not_a_run", lambda w, t: ["merge", str(t), "--out", str(t / "m")], 2, str("adapter")),
    Case("merge_out_not_empty", lambda w, t: ["merge", str(w.clf), "--out", str(w.root)], 2, "--out"),
    Case("score_not_a_reward_run", lambda w, t: ["score", str(w.clf), "--input", str(w.predict_in)], 2, "reward"),
    Case("compare_no_methods", lambda w, t: ["compare", _write(t / "c.yaml", yaml.safe_dump(
        {"output_dir": str(t / "runs"), "base": w.recipe_dict(t), "methods": {}}))], 2, "methods"),
    Case("remote_code_model_without_flag_embed", lambda w, t: ["embed", str(_evil_model(w, t)), "--input",
                                                               str(w.texts), "--out", str(t / "v.npy")],
         2, "--trust-remote-code", no_marker),
    Case("remote_code_model_without_flag_generate", lambda w, t: ["generate", str(_evil_model(w, t)), "--prompt", "hi"],
         2, "--trust-remote-code", no_marker),
    Case("remote_code_model_train_without_trust", lambda w, t: ["train", w.recipe(t, model={"name": str(
        _evil_model(w, t))})], 2, "model.trust_remote_code", no_marker),
    Case("compare_method_name_dotdot", lambda w, t: ["compare", _write(t / "c.yaml", yaml.safe_dump(
        {"output_dir": str(t / "runs"), "base": w.recipe_dict(t), "methods": {"../x": {}}}))], 2, "../x"),
]
CASES += MORE_CASES

EVEN_MORE = [
    Case("generate_out_is_a_folder", lambda w, t: ["generate", str(w.llama), "--input", _write(
        t / "p.jsonl", '{"prompt": "hi"}\n'), "--out", str(t)], 2, "folder"),
    Case("generate_input_not_utf8", lambda w, t: ["generate", str(w.llama), "--input", _write(
        t / "p.jsonl", b'{"prompt": "\xff"}\n'), "--out", str(t / "g.jsonl")], 2, "UTF-8"),
    Case("generate_input_missing", lambda w, t: ["generate", str(w.llama), "--input", str(t / "none.jsonl"),
                                                 "--out", str(t / "g.jsonl")], 2, "not found"),
    Case("generate_model_missing", lambda w, t: ["generate", str(t / "nope"), "--prompt", "hi"], 2, "not found"),
    Case("generate_sft_run_out_readonly", lambda w, t: ["generate", str(w.sft), "--input", _write(
        t / "p.jsonl", '{"prompt": "hi"}\n'), "--out", "/proc/lmforge-no-write/g.jsonl", "--max-new-tokens", "2"],
         1, "cannot write"),
    Case("eval_perplexity_data_missing", lambda w, t: ["eval", str(w.llama), "--task", "perplexity", "--data",
                                                       str(t / "none.jsonl")], 2, "not found"),
    Case("eval_perplexity_data_empty", lambda w, t: ["eval", str(w.llama), "--task", "perplexity", "--data",
                                                     _write(t / "e.jsonl", "\n")], 2, "e.jsonl"),
    Case("eval_perplexity_not_utf8", lambda w, t: ["eval", str(w.llama), "--task", "perplexity", "--data",
                                                   _write(t / "e.txt", b"ok\n\xff\n")], 2, "UTF-8"),
    Case("eval_perplexity_on_encoder", lambda w, t: ["eval", str(w.bert), "--task", "perplexity", "--data",
                                                     str(w.texts)], 2, "causal"),
    Case("eval_generation_no_reference", lambda w, t: ["eval", str(w.llama), "--task", "generation", "--data",
                                                       _write(t / "e.jsonl", '{"prompt": "hi"}\n')], 2, "e.jsonl"),
    Case("eval_sts_malformed", lambda w, t: ["eval", str(w.bert), "--task", "sts", "--data",
                                             _write(t / "s.jsonl", '{"sentence1": "a"}\n')], 2, "s.jsonl"),
    Case("eval_sts_score_not_a_number", lambda w, t: ["eval", str(w.bert), "--task", "sts", "--data", _write(
        t / "s.jsonl", '{"sentence1": "a", "sentence2": "b", "score": "high"}\n' * 3)], 2, "score"),
    Case("eval_retrieval_missing_file", lambda w, t: ["eval", str(w.bert), "--task", "retrieval", "--data",
                                                      str(t / "none.jsonl")], 2, "not found"),
    Case("eval_data_wrong_columns", lambda w, t: ["eval", str(w.clf), "--data", _write(
        t / "e.jsonl", '{"body": "x", "y": "pos"}\n')], 2, "e.jsonl"),
    Case("eval_out_readonly", lambda w, t: ["eval", str(w.clf), "--data", str(w.train), "--out",
                                            "/proc/lmforge-no-write/e.json"], 1, "cannot write"),
    Case("merge_out_readonly", lambda w, t: ["merge", str(w.sft), "--out", "/proc/lmforge-no-write/m"], 1,
         "cannot write"),
    Case("merge_out_is_a_file", lambda w, t: ["merge", str(w.sft), "--out", _write(t / "f.txt", "x")], 2, "--out"),
    Case("score_run_missing", lambda w, t: ["score", str(t / "none"), "--input", str(w.predict_in)], 2, "none"),
    Case("score_on_sft_run", lambda w, t: ["score", str(w.sft), "--input", str(w.predict_in)], 2, "reward"),
    Case("fill_mask_run_without_model", lambda w, t: ["fill-mask", str(w.clf), "a [MASK]"], 2, "model"),
    Case("compare_base_without_task", lambda w, t: ["compare", _write(t / "c.yaml", yaml.safe_dump(
        {"output_dir": str(t / "runs"), "base": {"model": {"name": "x"}}, "methods": {"a": {}}}))], 2, "task"),
    Case("compare_method_changes_split", lambda w, t: ["compare", _write(t / "c.yaml", yaml.safe_dump(
        {"output_dir": str(t / "runs"), "base": w.recipe_dict(t), "methods": {"a": {"data": {"eval_fraction": 0.5}}}
         }))], 2, "eval_fraction"),
    Case("compare_recipe_not_utf8", lambda w, t: ["compare", _write(t / "c.yaml", b"name: \xff\n")], 2, "UTF-8"),
    Case("config_show_not_utf8", lambda w, t: ["config", "show", _write(t / "r.yaml", b"task: \xff\n")], 2, "UTF-8"),
    Case("data_label_is_a_list", train_data("d.jsonl", _rows_text(GOOD[:8] + [{"text": "x", "label": [1, 2]}])),
         2, "label"),
    Case("data_label_is_a_mapping", train_data("d.jsonl", _rows_text(GOOD[:8] + [{"text": "x", "label": {"a": 1}}])),
         2, "label"),
    Case("data_one_label_only", train_data("d.jsonl", _rows_text([{"text": r["text"], "label": "pos"}
                                                                  for r in GOOD])), 2, "label"),
    Case("data_text_is_a_list", train_data("d.jsonl", _rows_text(GOOD[:8] + [{"text": ["a"], "label": "pos"}])),
         2, "must be text"),
    Case("data_columns_value_not_text", train_override("data.columns={text: [a, b]}"), 2, "data.columns"),
    Case("data_where_not_a_list", train_override("data.where={label: pos}"), 2, "data.where"),
    Case("seed_negative", train_override("seed=-1"), 2, "seed"),
    Case("seed_huge", train_override("seed=100000000000000000000000"), 2, "seed"),
    Case("lora_targets_missing", train_override("lora.target_modules=[no_such_layer]"), 2, "no_such_layer"),
    Case("lora_targets_bad_regex", train_override("lora.target_modules='(unclosed'"), 2, "target_modules"),
    Case("unfreeze_too_many", train_override("classify.mode=frozen", "classify.unfreeze_last=100"), 2,
         "unfreeze_last"),
    Case("attn_implementation_unknown", train_override("model.attn_implementation=flash"), 2,
         "model.attn_implementation"),
    Case("eval_batch_size_zero", train_override("train.eval_batch_size=0"), 2, "train.eval_batch_size"),
    Case("warmup_ratio_one", train_override("train.warmup_ratio=1"), 2, "train.warmup_ratio"),
    Case("best_metric_without_eval", train_override("train.best_metric=accuracy", "data.eval_fraction=0"),
         2, "eval data"),
]
CASES += EVEN_MORE

OTHER_COMMANDS = [
    Case("index_docs_missing", lambda w, t: ["index", "build", "--out", str(t / "ix"), "--docs", str(t / "none.jsonl"),
                                             "--model", str(w.bert)], 2, "not found"),
    Case("index_docs_not_utf8", lambda w, t: ["index", "build", "--out", str(t / "ix"), "--docs", _write(
        t / "d.jsonl", b'{"text": "\xff"}\n'), "--model", str(w.bert)], 2, "UTF-8"),
    Case("index_docs_no_text", lambda w, t: ["index", "build", "--out", str(t / "ix"), "--docs", _write(
        t / "d.jsonl", '{"body": "x"}\n'), "--model", str(w.bert)], 2, "text"),
    Case("index_chunk_size_zero", lambda w, t: ["index", "build", "--out", str(t / "ix"), "--docs", str(w.texts),
                                                "--model", str(w.bert), "--chunk-size", "0"], 2, "chunk"),
    Case("index_model_is_causal_garbage", lambda w, t: ["index", "build", "--out", str(t / "ix"), "--docs", str(w.texts),
                                                        "--model", str(t / "nope")], 2, "not found"),
    Case("search_index_missing", lambda w, t: ["search", str(t / "none"), "hello"], 2, "none"),
    Case("search_index_not_an_index", lambda w, t: ["search", str(w.clf), "hello"], 2, "index"),
    Case("search_k_zero", lambda w, t: ["search", str(t / "none"), "hello", "--k", "0"], 2, "k"),
    Case("cluster_input_missing", lambda w, t: ["cluster", "--input", str(t / "none.jsonl"), "--out",
                                                str(t / "c.jsonl"), "--model", str(w.bert)], 2, "not found"),
    Case("cluster_input_not_utf8", lambda w, t: ["cluster", "--input", _write(t / "x.txt", b"a\n\xff\n"),
                                                 "--out", str(t / "c.jsonl"), "--model", str(w.bert)], 2, "UTF-8"),
    Case("cluster_batch_size_zero", lambda w, t: ["cluster", "--input", str(w.texts), "--out", str(t / "c.jsonl"),
                                                  "--model", str(w.bert), "--batch-size", "0"], 2, "batch"),
    Case("tokenize_model_missing", lambda w, t: ["tokenize", str(t / "nope"), "--input", str(w.texts)], 2,
         "not found"),
    Case("tokenize_no_tokenizer", lambda w, t: ["tokenize", str((lambda m: (_no_tokenizer(m), m)[1])(
        w.model_copy(t))), "--input", str(w.texts)], 2, "tokenizer"),
    Case("report_not_a_run", lambda w, t: ["report", str(t)], 2, "run"),
    Case("report_out_is_a_folder", lambda w, t: ["report", str(w.clf), "--out", str(t)], 2, "HTML file"),
    Case("report_metrics_garbage", run_cmd("report", "clf", _put("metrics.jsonl", "{oops\n\xff")), 0, ""),
    Case("chain_not_utf8", lambda w, t: ["chain", _write(t / "c.yaml", b"steps: \xff\n"), "--input",
                                          str(w.predict_in), "--out", str(t / "o.jsonl"), "--model", str(w.llama)],
         2, "UTF-8"),
    Case("report_config_alias_bomb", run_cmd("report", "clf", _put("config.yaml", ALIAS_BOMB)), 0, ""),
    Case("prompt_recipe_missing", lambda w, t: ["prompt", str(t / "none.yaml"), "--input", str(w.predict_in),
                                                "--out", str(t / "o.jsonl"), "--model", str(w.llama)], 2, "none.yaml"),
    Case("prompt_recipe_not_utf8", lambda w, t: ["prompt", _write(t / "p.yaml", b"template: \xff\n"), "--input",
                                                 str(w.predict_in), "--out", str(t / "o.jsonl"), "--model",
                                                 str(w.llama)], 2, "UTF-8"),
    Case("prompt_recipe_duplicate_key", lambda w, t: ["prompt", _write(t / "p.yaml", "a: 1\na: 2\n"), "--input",
                                                      str(w.predict_in), "--out", str(t / "o.jsonl"), "--model",
                                                      str(w.llama)], 2, "duplicate key"),
    Case("inspect_model_missing", lambda w, t: ["inspect", str(t / "nope"), "hello"], 2, "not found"),
    Case("inspect_on_encoder", lambda w, t: ["inspect", str(w.bert), "good movie"], 2, "causal"),
    Case("inspect_layer_out_of_range", lambda w, t: ["inspect", str(w.llama), "good movie", "--layer", "99"],
         2, "layer"),
    Case("inspect_top_k_zero", lambda w, t: ["inspect", str(w.llama), "good movie", "--top-k", "0"], 2, "top"),
    Case("rag_index_missing", lambda w, t: ["rag", str(t / "none"), "what?", "--model", str(w.llama)], 2, "none"),
    Case("topics_show_not_a_topics_run", lambda w, t: ["topics", "show", str(w.clf)], 2, "topics"),
    Case("word2vec_similar_missing_model", lambda w, t: ["word2vec", "similar", str(t / "none"), "good"], 2, "none"),
    Case("word2vec_train_input_not_utf8", lambda w, t: ["word2vec", "train", _write(t / "c.txt", b"good \xff\n"),
                                                        "--out", str(t / "w2v")], 2, "UTF-8"),
]
CASES += OTHER_COMMANDS


# ---- running one case ----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    code: int | None
    err: str
    tb: str | None = None


def run_main(argv: list[str]) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except SystemExit as exc:  # argparse
        return Outcome(exc.code if isinstance(exc.code, int) else 1, err.getvalue())
    except BaseException:  # noqa: BLE001 - a traceback is what this suite counts
        return Outcome(None, err.getvalue(), traceback.format_exc())
    return Outcome(code, err.getvalue())


def leftovers(*roots: Path, before: set[Path] = frozenset()) -> list[str]:
    """``.tmp`` leftovers anywhere, and 0-byte files the command wrote (not in ``before``)."""
    bad = []
    for root in roots:
        for p in root.rglob("*"):
            if ".tmp" in p.name:
                bad.append(f"temporary leftover {p}")
            elif p not in before and p.is_file() and p.stat().st_size == 0 and p.suffix != ".lock":
                bad.append(f"0-byte file {p}")
    return bad


def judge(case: Case, world: World, t: Path) -> tuple[str, str]:
    """(verdict, detail): verdict is clear, traceback, accepted (wrongly) or unclear."""
    argv = case.make(world, t)
    before = set(t.rglob("*"))
    res = run_main(argv)
    if res.tb is not None:
        return "traceback", res.tb.strip().splitlines()[-1]
    problems = []
    lines = [ln for ln in res.err.strip().splitlines() if ln.strip() and not ln.startswith(("WARNING", "INFO"))]
    if case.code == 0:
        if res.code != 0:
            problems.append(f"exit {res.code}: {lines[-1] if lines else ''}")
    else:
        if res.code == 0:
            return "accepted", "exit 0"
        if res.code != case.code:
            problems.append(f"exit {res.code} (want {case.code})")
        if len(lines) != 1 or not lines[0].startswith("lmforge: error: "):
            problems.append(f"{len(lines)} stderr lines: {lines[:3]!r:.300}")
        elif case.needle not in lines[0]:
            problems.append(f"message lacks {case.needle!r}: {lines[0][:300]}")
        elif len(lines[0]) > MAX_LINE:
            problems.append(f"message of {len(lines[0])} characters")
        if argv[0] == "train" and (t / "runs").exists():
            problems.append("a run directory was created")
    if case.check is not None and (msg := case.check(world, t)):
        problems.append(msg)
    problems += leftovers(t, before=before)
    return ("clear" if not problems else "unclear"), "; ".join(problems) or (lines[0] if lines else "")


# ---- pytest ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("bad_inputs_world"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    verdict, detail = judge(case, world, tmp_path)
    assert verdict == "clear", detail


def test_the_world_holds_no_leftovers(world):
    assert leftovers(world.root / "runs") == []


# ---- a stopped run: read-only output and a full disk (exit 1) --------------------------------------------------
@contextlib.contextmanager
def full_disk(limit: int | None):
    """Files of this process cannot grow past ``limit`` bytes while the block runs: a write past it
    fails with EFBIG, as one on a full disk fails with ENOSPC (SIGXFSZ ignored; soft limit only)."""
    if limit is None:
        yield
        return
    import resource
    import signal

    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


STOPPED = [
    ("predict_readonly_out", lambda w, t: ["predict", str(w.clf), "--input", str(w.predict_in),
                                           "--out", "/proc/lmforge-no-write/out.jsonl"], None),
    ("embed_readonly_out", lambda w, t: ["embed", str(w.bert), "--input", str(w.texts),
                                         "--out", "/proc/lmforge-no-write/v.npy"], None),
    ("generate_readonly_out", lambda w, t: ["generate", str(w.llama), "--input", _write(
        t / "p.jsonl", '{"prompt": "hi"}\n'), "--out", "/proc/lmforge-no-write/g.jsonl", "--max-new-tokens", "2"], None),
    ("train_readonly_output_dir", lambda w, t: ["train", w.recipe(t, output_dir="/proc/lmforge-no-write")], None),
    ("train_full_disk", lambda w, t: ["train", w.recipe(t, train={"max_steps": 4, "save_every": 2})], 20_000),
    ("predict_full_disk", lambda w, t: ["predict", str(w.clf), "--input", str(w.predict_in),
                                        "--out", str(t / "o.jsonl")], 10),
    ("embed_full_disk", lambda w, t: ["embed", str(w.bert), "--input", str(w.texts), "--out", str(t / "v.npy")], 10),
]


def judge_stopped(make, limit, world: World, t: Path) -> tuple[str, str]:
    argv = make(world, t)
    before = set(t.rglob("*"))
    with full_disk(limit):
        res = run_main(argv)
    if res.tb is not None:
        return "traceback", res.tb.strip().splitlines()[-1]
    code, err = res.code, res.err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("lmforge: error: ")]
    problems = []
    if code == 0:
        return "accepted", "exit 0"
    if code != 1:
        problems.append(f"exit {code} (want 1)")
    if len(lines) != 1:
        problems.append(f"{len(lines)} error lines")
    problems += leftovers(t, before=before)
    return ("clear" if not problems else "unclear"), "; ".join(problems) or lines[0]


@pytest.mark.parametrize("make,limit", [s[1:] for s in STOPPED], ids=[s[0] for s in STOPPED])
def test_stopped_run_exit_1(make, limit, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    verdict, detail = judge_stopped(make, limit, world, tmp_path)
    assert verdict == "clear", detail


# ---- the tally -------------------------------------------------------------------------------------------------
def tally(root: Path, only: str | None = None) -> dict:
    import tempfile

    os.environ.setdefault("LMFORGE_CACHE", str(root / "cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    world = World(root / "world")
    counts = {"tried": 0, "clear": 0, "traceback": 0, "accepted": 0, "unclear": 0}
    cases = [(c.id, lambda c=c, t=None: judge(c, world, t)) for c in CASES]
    cases += [(sid, lambda make=make, limit=limit, t=None: judge_stopped(make, limit, world, t))
              for sid, make, limit in STOPPED]
    for cid, fn in cases:
        if only and only not in cid:
            continue
        t = Path(tempfile.mkdtemp(dir=root, prefix="case-"))  # no case id in paths: needles must match the message
        cwd = os.getcwd()
        os.chdir(t)
        try:
            verdict, detail = fn(t=t)
        finally:
            os.chdir(cwd)
        counts["tried"] += 1
        counts[verdict] += 1
        print(f"{verdict:9s} {cid:40s} {detail[:220]} {detail[-120:] if len(detail) > 220 else ''}", flush=True)
    return counts


if __name__ == "__main__":
    import logging
    import tempfile

    import torch

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(tally(Path(d), sys.argv[1] if len(sys.argv) > 1 else None)))


def test_a_full_disk_at_the_second_checkpoint_keeps_the_first(world, tmp_path, monkeypatch):
    """The disk fills while step 4's checkpoint is written: one line, exit 1, step 2 intact and
    loadable, no staging folder, no 0-byte file; resuming then continues from step 2."""
    import errno

    import torch

    from lmforge.train import checkpoint as ckpt

    recipe = world.recipe(tmp_path, train={"max_steps": 6, "save_every": 2})
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    before = set(tmp_path.rglob("*"))
    res = run_main(["train", recipe])
    assert res.tb is None, res.tb
    lines = res.err.strip().splitlines()
    assert res.code == 1 and len(lines) == 1 and "No space left on device" in lines[0], lines
    root = tmp_path / "runs" / "r" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000002"]
    assert ckpt.read_checkpoint(root / "step-00000002")["state"]["step"] == 2
    assert leftovers(tmp_path, before=before) == []
    monkeypatch.setattr(torch, "save", real_save)
    res = run_main(["train", recipe, "train.resume=true"])
    assert res.code == 0, res.err
    assert [p.name for p in ckpt.list_checkpoints(root)][-1] == "step-00000006"
