"""``lmforge prompt | chain | agent`` and ``chat --memory`` end to end on a tiny saved model;
bad input is one line, exit 2, nothing written."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmforge.cli import main

from .conftest import build_model, build_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_lm")
    tok = build_tokenizer()
    build_model(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error:"), err
    for f in fragments:
        assert f in err[0], err[0]


def test_prompt_command_with_json_schema(model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("instruction: 'Describe {who} as JSON.'\n"
                      "output: {json_schema: {type: object, properties: {ok: {type: boolean}}, required: [ok]}}\n"
                      "generation: {max_new_tokens: 12}\n", encoding="utf-8")
    inp = _jsonl(tmp_path / "in.jsonl", [{"who": "a cat"}, {"who": "a dog"}])
    out = tmp_path / "out.jsonl"
    assert main(["prompt", str(recipe), "--input", str(inp), "--out", str(out), "--model", str(model_dir),
                 "--precision", "fp32"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["who"] for r in rows] == ["a cat", "a dog"]
    assert all(r["valid"] and isinstance(json.loads(r["output"])["ok"], bool) for r in rows)


@pytest.mark.parametrize("recipe_text, message", [
    ("instruction: 'Summarise {dialogue}'\n", "instruction uses {dialogue}"),
    ("instruction: x\noutput: {json_schema: {type: bogus}}\n", "not valid JSON Schema"),
    ("instruction: x\noutput: {json_schema: {type: array, items: {type: integer}, minItems: 3, maxItems: 1}}\n",
     "schema"),
    ("instruction: x\noutput: {regex: '[a-'}\n", "does not compile"),
])
def test_prompt_bad_input_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys, recipe_text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text, encoding="utf-8")
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    out = tmp_path / "out.jsonl"
    assert main(["prompt", str(recipe), "--input", str(inp), "--out", str(out), "--model", str(model_dir)]) == 2
    _one_line_error(capsys, message)
    assert not out.exists()


def test_chain_command_and_cycle(model_dir, tmp_path, capsys):
    chain = tmp_path / "c.yaml"
    chain.write_text("steps:\n  - {name: summary, prompt: 'Sum {idea}', max_new_tokens: 4}\n"
                     "  - {name: title, prompt: 'Title {summary}', max_new_tokens: 3}\n", encoding="utf-8")
    inp = _jsonl(tmp_path / "in.jsonl", [{"idea": "a cat"}])
    out = tmp_path / "run"
    assert main(["chain", str(chain), "--input", str(inp), "--out", str(out), "--model", str(model_dir)]) == 0
    assert (out / "steps" / "summary.jsonl").is_file() and (out / "steps" / "title.jsonl").is_file()
    capsys.readouterr()
    chain.write_text("steps:\n  - {name: a, prompt: '{b}'}\n  - {name: b, prompt: '{a}'}\n", encoding="utf-8")
    out2 = tmp_path / "run2"
    assert main(["chain", str(chain), "--input", str(inp), "--out", str(out2), "--model", str(model_dir)]) == 2
    _one_line_error(capsys, "cycle: a -> b -> a")
    assert not out2.exists()


def test_agent_command_saves_transcript_and_refuses_unknown_tool(model_dir, tmp_path, capsys):
    tr = tmp_path / "t.json"
    assert main(["agent", str(model_dir), "What is 2 + 2?", "--tools", "calculator", "--max-steps", "2",
                 "--max-new-tokens", "8", "--transcript", str(tr)]) == 0
    saved = json.loads(tr.read_text())
    assert saved["tools"] == ["calculator"] and 1 <= saved["steps"] <= 2 and saved["transcript"]
    capsys.readouterr()
    assert main(["agent", str(model_dir), "q", "--tools", "calculator,teleport", "--transcript",
                 str(tmp_path / "t2.json")]) == 2
    _one_line_error(capsys, "unknown tool 'teleport'")
    assert not (tmp_path / "t2.json").exists()


def test_chat_memory_window_and_show(model_dir):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = "first question\nsecond question\nthird question\n/memory\n/exit\n"
    proc = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(model_dir), "--temperature", "0",
                           "--max-new-tokens", "3", "--memory", "window:1", "--precision", "fp32"],
                          input=script, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout.split("[memory window:1")[1]
    assert "third question" in shown and "second question" in shown and "first question" not in shown


def test_chat_bad_memory_is_one_line(model_dir, capsys):
    assert main(["chat", str(model_dir), "--memory", "window:0"]) == 2
    _one_line_error(capsys, "window:N")
