"""Issue 12 section 5 through the command line: each bad adapter input is one line on stderr, exit
code 2, and nothing is written (no run folder, no merged folder): an unknown kind, another kind's
options, a kind the task cannot use (naming the tasks that can), an adapter folder of one kind read
as another, a base model whose shapes don't match the adapter."""
from __future__ import annotations

import json

import yaml

from conftest import sentiment_rows, write_jsonl, write_yaml
from lmforge.cli import main


def refused(argv: list[str], capsys, *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert all(n in err[0] for n in needles), err[0]
    return err[0]


def recipe(tmp_path, model_dir, task="classify", **section) -> str:
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(16))
    return str(write_yaml(tmp_path / f"{task}.yaml", {
        "task": task, "name": "run", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(data), "eval_fraction": 0.25, "max_length": 32},
        "adapter": {"kind": "lora", "r": 2}, task: {"mode": "adapter"} | section,
        "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-2, "progress": False}}))


def test_unknown_kind(tmp_path, tiny_bert_dir, capsys):
    refused(["train", recipe(tmp_path, tiny_bert_dir), "adapter.kind=qlora"], capsys,
            "unknown adapter kind 'qlora' (choose from", "dora", "bottleneck")
    assert not (tmp_path / "runs").exists()


def test_options_of_another_kind(tmp_path, tiny_bert_dir, capsys):
    refused(["train", recipe(tmp_path, tiny_bert_dir), "adapter={kind: ia3, r: 4}"], capsys,
            "r: an option of lora and dora, not of ia3 (ia3 takes:")
    assert not (tmp_path / "runs").exists()


def test_kind_the_task_cannot_use_names_the_tasks_that_can(tmp_path, tiny_bert_dir, capsys):
    refused(["train", recipe(tmp_path, tiny_bert_dir, task="embed"), "adapter={kind: prompt, num_virtual_tokens: 2}"],
            capsys, "prompt cannot be used by task embed", "tasks that can: classify, ner, sft, preference, reward")
    assert not (tmp_path / "runs").exists()


def test_adapter_folder_of_one_kind_read_as_another(tmp_path, tiny_bert_dir, capsys):
    path = recipe(tmp_path, tiny_bert_dir)
    assert main(["train", path, "adapter={kind: ia3}"]) == 0
    run = tmp_path / "runs" / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["adapter"] = {"kind": "lora", "r": 2}  # the run says lora, its adapter/ folder is IA3
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    out = tmp_path / "pred.jsonl"
    refused(["predict", str(run), "--input", str(tmp_path / "d.jsonl"), "--out", str(out)], capsys,
            "is a ia3 adapter, not lora")
    assert not out.exists()


def test_base_model_whose_shapes_do_not_match(tmp_path, tiny_llama_dir, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmforge.adapters import LoraSpec, apply_adapter, save_adapter

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    apply_adapter(model, LoraSpec(r=2, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_llama_dir), task_type="CAUSAL_LM")
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    wide = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k in LlamaConfig().to_dict()}
                                        | {"hidden_size": 48, "head_dim": 12}))
    wide.save_pretrained(tmp_path / "wide")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path / "wide")
    refused(["merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "wide"), "--out", str(tmp_path / "merged")],
            capsys, "has shape", "the model expects", "(a different base model?)")
    assert not (tmp_path / "merged").exists()
