"""`lmforge generate` / `lmforge chat` end to end on a tiny Llama: streaming, JSONL in/out,
adapters from a run directory, bad input (one line, exit 2), the chat loop driven by stdin."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import write_jsonl, write_yaml
from lmforge.adapters import LoraSpec, apply_lora, load_adapter, save_adapter
from lmforge.cli import main
from lmforge.generation import GenerationConfig, generate
from lmforge.models import load_tokenizer

FP32 = ["--precision", "fp32"]


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with widely spread weights (the default init repeats one token)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = tmp_path_factory.mktemp("varied_llama")
    model.save_pretrained(out)
    load_tokenizer(tiny_llama_dir).save_pretrained(out)
    return out


def _api(model_dir, prompts, adapter=None, **cfg):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        load_adapter(model, adapter)
    kw = {"max_new_tokens": 8} | cfg
    chat = kw.pop("chat", None)
    return generate(model, load_tokenizer(model_dir), prompts, GenerationConfig(**kw), chat=chat)


def test_generate_prompt_streams_the_api_result(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "the movie was", "--max-new-tokens", "8", *FP32]) == 0
    assert capsys.readouterr().out == _api(model_dir, ["the movie was"])[0] + "\n"
    assert main(["generate", str(model_dir), "--prompt", "the movie was", "--raw", "--no-cache",
                 "--max-new-tokens", "8", *FP32]) == 0
    assert capsys.readouterr().out == _api(model_dir, ["the movie was"], chat=False)[0] + "\n"


def test_generate_jsonl_in_out(model_dir, tmp_path, capsys):
    rows = [{"id": 1, "prompt": "the movie was good"}, {"id": 2, "prompt": "a dull plot"},
            {"id": 3, "messages": [{"role": "user", "content": "is it fine ?"}]}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(model_dir), "--input", str(src), "--out", str(out), "--batch-size", "2",
                 "--temperature", "0.8", "--top-k", "20", "--seed", "3", "--max-new-tokens", "8", *FP32]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["generations"] == 3
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [1, 2, 3]
    prompts = [r.get("prompt") or r["messages"] for r in rows]
    expected = _api(model_dir, prompts, temperature=0.8, top_k=20, seed=3, batch_size=2)
    assert [g["generation"] for g in got] == expected


def test_generate_with_adapter_from_a_run_dir(model_dir, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    run = tmp_path / "run"
    save_adapter(model, run / "adapter", base_model_name_or_path=str(model_dir), task_type="CAUSAL_LM")
    write_yaml(run / "config.yaml", {"task": "sft", "model": {"name": str(model_dir)}})
    expected = _api(model_dir, ["the movie was"], adapter=run / "adapter")[0]
    assert expected != _api(model_dir, ["the movie was"])[0]
    for argv in (["generate", str(model_dir), "--adapter", str(run)], ["generate", str(run)]):
        assert main([*argv, "--prompt", "the movie was", "--max-new-tokens", "8", *FP32]) == 0
        assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("extra, message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["--prompt", "hi", "--top-p", "0"], "top_p"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    ([], "either --prompt"),
    (["--input", "x.jsonl"], "needs --out"),
    (["--prompt", "hi", "--out", "o.jsonl"], "--out goes with --input"),
    (["--input", "{missing}", "--out", "o.jsonl"], "missing 'prompt'"),
    (["--input", "{missing}", "--out", "o.jsonl", "--adapter", "no/such/dir"], "missing 'prompt'"),
])
def test_bad_input_one_line_exit_2(model_dir, tmp_path, capsys, extra, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    extra = [str(bad) if a == "{missing}" else a for a in extra]
    assert main(["generate", str(model_dir), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error:") and message in err[0]
    assert not (tmp_path / "o.jsonl").exists()


def test_adapter_not_found_is_one_line(model_dir, capsys):
    assert main(["generate", str(model_dir), "--adapter", "no/such/dir", "--prompt", "hi"]) == 2
    assert "no/such/dir" in capsys.readouterr().err


def test_chat_loop_over_stdin(model_dir):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = "the movie was\n\nis it good ?\n/reset\nthe movie was\n/exit\nnever read\n"
    proc = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(model_dir), "--temperature", "0",
                           "--max-new-tokens", "6", *FP32], input=script, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and lines[2] == "(history cleared)"
    first = _api(model_dir, [[{"role": "user", "content": "the movie was"}]], max_new_tokens=6)[0]
    history = [{"role": "user", "content": "the movie was"}, {"role": "assistant", "content": first.strip()},
               {"role": "user", "content": "is it good ?"}]
    second = _api(model_dir, [history], max_new_tokens=6)[0]
    assert lines[0] == first and lines[1] == second
    assert lines[3] == first  # /reset forgot the history
