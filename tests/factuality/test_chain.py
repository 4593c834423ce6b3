"""The chain on a tiny random Llama: sample -> score -> pairs -> DPO -> held-out report, and the
commands' bad inputs (one line, exit 2, nothing written)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.factuality.experiment import run_recipe

from conftest import make_tiny_bert, write_jsonl

WORDS = "good great fine lovely nice bad awful poor boring dull movie film plot actor story scene".split()


def _questions(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b, c = WORDS[i % 16], WORDS[(i * 3 + 1) % 16], WORDS[(i * 7 + 2) % 16]
        rows.append({"id": f"q{i}", "question": f"is the {a} {b} w{i} ?", "answer": [f"the {a} {c} is {b}",
                                                                                     f"it was {c}"]})
    return rows


def _read(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def chain(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fact")
    prompts = write_jsonl(tmp / "qa.jsonl", _questions(14))
    recipe = {"experiment": "truthfulqa", "name": "tiny", "output_dir": str(tmp / "runs"), "seed": 3,
              "model": str(tiny_llama_dir), "variants": ["reference", "free"],
              "data": {"prompts": str(prompts), "n_tuning": 7, "n_heldout": 4},
              "sample": {"n": 3, "temperature": 1.5, "top_p": 1.0, "max_new_tokens": 6, "batch_size": 4},
              "score": {"checker": "lexical", "threshold": 0.15, "free_group": "rules", "rule": "jaccard",
                        "jaccard_min": 0.3},
              "pairs": {"margin": 0.0, "max_pairs_per_prompt": 2},
              "dpo": {"data": {"max_length": 64, "eval_fraction": 0.0},
                      "preference": {"max_prompt_length": 40}, "train": {"batch_size": 2, "max_steps": 2}},
              "eval": {"max_new_tokens": 6, "n_boot": 200, "batch_size": 4}}
    return tmp, recipe, run_recipe(recipe)


def test_chain_end_to_end(chain):
    tmp, recipe, report = chain
    run = tmp / "runs" / "tiny"
    samples = _read(run / "samples.jsonl")
    assert report["tuning_questions"] + report["heldout_questions"] + report["paraphrases_removed"] <= 14
    assert len(samples) == 3 * report["tuning_questions"] - report.get("dropped_empty_samples", 0)
    assert all(isinstance(r["logprob"], float) and r["logprob"] < 0 and r["answer_tokens"] > 0 for r in samples)
    ref = report["variants"]["reference"]
    assert ref["pairs"] > 0 and (run / "dpo-reference" / "adapter" / "adapter_config.json").is_file()
    held = ref["heldout"]
    assert set(held) == {"supported_fraction", "any_unsupported", "length_words", "claims", "informative_fraction",
                         "echo_fraction"}
    assert held["informative_fraction"]["after"] <= held["supported_fraction"]["after"]
    assert held["supported_fraction"]["low"] <= held["supported_fraction"]["change"] <= held["supported_fraction"]["high"]
    pairs = _read(run / "pairs-reference.jsonl")
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert len(_read(run / "sft-reference.jsonl")) == len({r["id"] for r in samples})
    assert json.loads((run / "report.json").read_text()) == json.loads(json.dumps(report))


def test_heldout_prompts_never_reach_sampling_or_pairs(chain):
    tmp, _, _ = chain
    run = tmp / "runs" / "tiny"
    held = {r["prompt"] for r in _read(run / "heldout.jsonl")}
    held_ids = {r["id"] for r in _read(run / "heldout.jsonl")}
    assert len(held) == 4
    seen = {r["prompt"] for r in _read(run / "samples.jsonl")}
    for f in run.glob("pairs-*.jsonl"):
        seen |= {r["prompt"] for r in _read(f)}
        assert not {r["id"] for r in _read(f)} & held_ids
    dpo_train = run / "dpo-reference" / "config.yaml"
    assert dpo_train.is_file() and "pairs-reference.jsonl" in dpo_train.read_text()
    assert not seen & held


def test_resume_reuses_stages_and_refuses_other_recipes(chain):
    tmp, recipe, report = chain
    again = run_recipe(recipe | {"resume": True})
    assert again["variants"]["reference"]["heldout"] == report["variants"]["reference"]["heldout"]
    assert main(["factuality", "run", str(_yaml(tmp / "r.yaml", recipe))]) == 2  # exists, resume off
    assert main(["factuality", "run", str(_yaml(tmp / "r2.yaml", recipe | {"resume": True, "seed": 4}))]) == 2


def test_free_variant_groups_with_its_own_checker(chain):
    """score.free_checker groups the free variant's samples; held-out answers are still judged by score.checker."""
    import shutil

    from lmforge.factuality.checkers import LexicalChecker
    from lmforge.factuality.pairs import group_by_prompt
    from lmforge.factuality.scoring import group_with_checker

    tmp, recipe, report = chain
    src, dst = tmp / "runs" / "tiny", tmp / "runs" / "tiny-free"
    dst.mkdir()
    for f in ("samples.jsonl", "greedy-base.jsonl"):  # the same seed and split: reuse the sampled stages
        shutil.copy(src / f, dst / f)
    score = recipe["score"] | {"free_group": "nli", "free_checker": "lexical", "free_threshold": 0.5}
    free = run_recipe(recipe | {"name": "tiny-free", "variants": ["free"], "resume": True, "score": score})
    scored = group_by_prompt(_read(dst / "scored-free.jsonl"))
    strict, loose = LexicalChecker(threshold=0.5), LexicalChecker(threshold=0.15)
    differs = False
    for rows in scored.values():
        answers = [r["answer"] for r in rows]
        assert [r["class"] for r in rows] == group_with_checker(answers, strict)
        differs |= group_with_checker(answers, strict) != group_with_checker(answers, loose)
    assert differs  # the two thresholds group these samples differently, so the test can tell them apart
    base = json.loads((src / "report.json").read_text())["variants"]["reference"]["heldout"]
    if free["variants"]["free"].get("heldout"):  # same judge (score.checker) for the before figure
        assert free["variants"]["free"]["heldout"]["supported_fraction"]["before"] == base["supported_fraction"]["before"]


def test_validation_questions_are_carved_from_tuning_and_never_sampled(chain, capsys):
    """data.n_validation: the first k tuning questions of the split are a validation set with their own
    before/after figures; they never reach sampling or pairs, and they are not held-out questions."""
    from lmforge.factuality.data import read_prompts, split_heldout

    tmp, recipe, _ = chain
    rec = recipe | {"name": "tiny-val", "variants": ["reference"],
                    "data": recipe["data"] | {"n_validation": 2}}
    report = run_recipe(rec)
    run = tmp / "runs" / "tiny-val"
    tuning, held, _ = split_heldout(read_prompts(recipe["data"]["prompts"]), 4, 7, seed=3)
    val_ids = [r["id"] for r in _read(run / "validation.jsonl")]
    assert val_ids == [r["id"] for r in tuning[:2]]
    assert [r["id"] for r in _read(run / "tuning.jsonl")] == [r["id"] for r in tuning[2:]]
    assert report["validation_questions"] == 2 and report["tuning_questions"] == 5
    sampled = {r["id"] for r in _read(run / "samples.jsonl")} | {r["id"] for r in _read(run / "pairs-reference.jsonl")}
    assert sampled and not sampled & set(val_ids) and not set(val_ids) & {r["id"] for r in held}
    assert [r["id"] for r in _read(run / "greedy-base-validation.jsonl")] == val_ids
    ref = report["variants"]["reference"]
    assert set(ref["validation"]) == set(ref["heldout"]) >= {"supported_fraction", "any_unsupported",
                                                             "length_words", "claims", "echo_fraction"}
    assert (run / "greedy-reference-validation.jsonl").is_file()
    bad = tmp / "bad-val.yaml"
    _yaml(bad, rec | {"name": "tiny-val-bad", "data": recipe["data"] | {"n_validation": 7}})
    assert main(["factuality", "run", str(bad)]) == 2
    assert "n_validation" in capsys.readouterr().err
    assert not (tmp / "runs" / "tiny-val-bad").exists()


def _yaml(path: Path, obj: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(obj), encoding="utf-8")
    return path


def test_commands_chain_and_preference_task_reads_pairs(chain, tiny_llama_dir, tmp_path):
    tmp, _, _ = chain
    prompts = write_jsonl(tmp_path / "p.jsonl", _questions(3))
    out = tmp_path / "s.jsonl"
    assert main(["factuality", "sample", str(tiny_llama_dir), "--prompts", str(prompts), "--out", str(out),
                 "-n", "3", "--max-new-tokens", "5", "--seed", "1", "--temperature", "1.5"]) == 0
    rows = _read(out)
    assert {r["sample"] for r in rows} <= {0, 1, 2} and all(r["references"] for r in rows)
    # same seed, same samples
    out2 = tmp_path / "s2.jsonl"
    main(["factuality", "sample", str(tiny_llama_dir), "--prompts", str(prompts), "--out", str(out2),
          "-n", "3", "--max-new-tokens", "5", "--seed", "1", "--temperature", "1.5"])
    assert _read(out2) == rows
    assert main(["factuality", "score", str(out), "--out", str(tmp_path / "sc.jsonl"), "--method", "reference",
                 "--checker", "lexical"]) == 0
    scored = _read(tmp_path / "sc.jsonl")
    assert all(r["supported"] + r["unsupported"] == r["claims"] and 0 <= r["score"] <= 1 for r in scored)
    assert main(["factuality", "score", str(out), "--out", str(tmp_path / "sf.jsonl"), "--method", "free",
                 "--rule", "exact"]) == 0
    free = _read(tmp_path / "sf.jsonl")
    assert all(0 < r["score"] <= 1 and r["entropy"] >= 0 for r in free)


def test_preference_task_trains_on_pairs_file_unchanged(chain, tiny_llama_dir):
    from lmforge.api import config, train_config

    tmp, _, _ = chain
    pairs = tmp / "runs" / "tiny" / "pairs-reference.jsonl"
    run = train_config(config({"task": "preference", "name": "direct", "output_dir": str(tmp / "direct"),
                               "model": {"name": str(tiny_llama_dir)},
                               "data": {"train": str(pairs), "max_length": 64, "eval_fraction": 0.0},
                               "preference": {"mode": "lora"}, "train": {"batch_size": 2, "max_steps": 1}}))
    assert (run.run_dir / "adapter").is_dir()


# ---- bad input: one line, exit 2, nothing written -------------------------------------------------
def _bad(capsys, argv, out: Path, match: str):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err and "Traceback" not in err, err
    assert not out.exists() and not list(out.parent.glob(".tmp-*"))


def test_bad_inputs(capsys, tmp_path, tiny_llama_dir):
    samples = write_jsonl(tmp_path / "s.jsonl", [
        {"id": "a", "prompt": "q one", "answer": "It is good.", "references": ["It is good."]},
        {"id": "a", "prompt": "q one", "answer": "It is bad.", "references": ["It is good."]},
        {"id": "b", "prompt": "q two", "answer": "Fine movie.", "references": ["Fine."]}])
    out = tmp_path / "o.jsonl"
    no_refs = write_jsonl(tmp_path / "nr.jsonl", [{"prompt": "q", "answer": "An answer here."}])
    _bad(capsys, ["factuality", "score", str(no_refs), "--out", str(out), "--method", "reference",
                  "--checker", "lexical"], out, "no 'references'")
    _bad(capsys, ["factuality", "score", str(samples), "--out", str(out), "--method", "free"], out,
         "needs N >= 2 samples")
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "answer": "  ", "references": ["r"]}])
    _bad(capsys, ["factuality", "score", str(empty), "--out", str(out), "--method", "reference",
                  "--checker", "lexical"], out, "empty answer")
    _bad(capsys, ["factuality", "pairs", str(empty), "--out", str(out)], out, "score")
    # a checker run of the wrong kind: a causal-LM run directory, and a plain model folder
    run = tmp_path / "sft-run"
    run.mkdir()
    (run / "config.yaml").write_text(f"task: sft\nname: x\nmodel:\n  name: {tiny_llama_dir}\n"
                                     f"data:\n  train: {samples}\n", encoding="utf-8")
    _bad(capsys, ["factuality", "score", str(samples), "--out", str(out), "--method", "reference",
                  "--checker", str(run)], out, "'sft' run is not a factuality checker")
    _bad(capsys, ["factuality", "score", str(samples), "--out", str(out), "--method", "reference",
                  "--checker", str(tiny_llama_dir)], out, "not a factuality checker")
    _bad(capsys, ["factuality", "sample", str(tiny_llama_dir), "--prompts", str(tmp_path / "missing.jsonl"),
                  "--out", str(out)], out, "missing.jsonl")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "is it good ?"}])
    _bad(capsys, ["factuality", "sample", str(tiny_llama_dir), "--prompts", str(prompts), "--out", str(out),
                  "-n", "1", "--temperature", "0"], out, "temperature")
    _bad(capsys, ["factuality", "sample", str(tiny_llama_dir), "--prompts", str(samples), "--out", str(out)], out,
         "duplicate id 'a'")
    _bad(capsys, ["factuality", "pairs", str(samples), "--out", str(out)], out, "'score'")


def test_nli_checker_trains_and_loads(tmp_path, capsys):
    from lmforge.factuality.checkers import NLIChecker, load_checker

    bert = make_tiny_bert(tmp_path / "bert")
    rows = [{"premise": f"the {w} movie is good", "hypothesis": f"the {w} movie is good", "label": "entailment"}
            for w in WORDS[:6]] + [{"premise": f"the {w} film", "hypothesis": "awful plot", "label": "neutral"}
                                   for w in WORDS[:6]] + [{"premise": "x", "hypothesis": "y", "label": "-"}]
    data = write_jsonl(tmp_path / "nli.jsonl", rows)
    out = tmp_path / "checker"
    assert main(["factuality", "checker", "--train", str(data), "--eval", str(data), "--out", str(out),
                 "--base", str(bert), "--batch-size", "4", "--max-length", "32", "--lr", "1e-3"]) == 0
    info = json.loads((out / "checker.json").read_text())
    assert info["kind"] == "nli" and info["train_pairs"] == 12 and 0 <= info["accuracy"] <= 1
    chk = load_checker(str(out))
    assert isinstance(chk, NLIChecker) and chk.support([("a b", "a b")]).shape == (1,)
    (out / "checker.json").write_text('{"kind": "sts"}')
    _bad(capsys, ["factuality", "score", str(data), "--out", str(tmp_path / "o.jsonl"), "--method", "reference",
                  "--checker", str(out)], tmp_path / "o.jsonl", "")


def test_embedding_checker(tmp_path):
    from lmforge.factuality.checkers import EmbeddingChecker, load_checker

    bert = make_tiny_bert(tmp_path / "bert")
    chk = load_checker(f"embedding:{bert}", threshold=0.5)
    assert isinstance(chk, EmbeddingChecker) and chk.threshold == 0.75
    p = chk.support([("good movie", "good movie"), ("good movie", "awful plot w3 w9")])
    assert p[0] == pytest.approx(1.0, abs=1e-5) and 0 <= p[1] <= 1


def test_compare_command_by_hand(tmp_path, capsys):
    refs = ["watermelon seeds pass through the digestive system"]
    before = write_jsonl(tmp_path / "b.jsonl", [
        {"id": "1", "answer": "Seeds grow in your stomach.", "references": refs},
        {"id": "2", "answer": "", "references": refs}])
    after = write_jsonl(tmp_path / "a.jsonl", [
        {"id": "2", "answer": "Watermelon seeds pass through the digestive system.", "references": refs},
        {"id": "1", "answer": "Seeds grow in your stomach.", "references": refs}])
    assert main(["factuality", "compare", str(before), str(after), "--checker", "lexical", "--n-boot", "100"]) == 0
    rep = json.loads(capsys.readouterr().out)
    # question 1 unchanged (0 supported of 1); question 2: empty (0) -> fully supported (1)
    assert rep["prompts"] == 2
    assert rep["supported_fraction"]["before"] == 0.0 and rep["supported_fraction"]["after"] == 0.5
    assert rep["any_unsupported"]["before"] == 0.5 and rep["any_unsupported"]["after"] == 0.5
    _bad(capsys, ["factuality", "compare", str(before), str(tmp_path / "none.jsonl"), "--checker", "lexical"],
         tmp_path / "never.json", "none.jsonl")


def test_answer_logprob_equals_full_softmax_by_hand(tiny_llama_dir):
    import torch

    from lmforge.causal_lm import load_causal_lm, resolve_source
    from lmforge.data.chat import Formatter
    from lmforge.factuality.sampler import answer_logprobs

    model, tok, _ = load_causal_lm(resolve_source(str(tiny_llama_dir)))
    prompts, answers = ["is the movie good ?", "bad plot ?"], ["the movie is good .", "awful"]
    got = answer_logprobs(model, tok, prompts, answers, batch_size=2)
    fmt = Formatter.create(tok)
    for (lp, n), p, a in zip(got, prompts, answers):
        p_ids, c_ids, _ = fmt.encode_completion(p, a)
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]  # (T, V)
        want = sum(float(logp[t - 1, ids[0, t]]) for t in range(len(p_ids), ids.shape[1]))
        assert n == len(c_ids) and lp == pytest.approx(want, abs=1e-4)


def test_legacy_dpo_lora_section_reads_as_adapter_and_resumes(tmp_path):
    """``dpo.lora`` (deprecated) loads as ``dpo.adapter: {kind: lora}``; a run folder whose saved recipe
    has the old form resumes with the new one, and still refuses other adapter values."""
    from lmforge.errors import LmforgeError
    from lmforge.factuality.experiment import DEFAULTS, _merge, _Stages, load_recipe

    base = {"experiment": "summary_pairs", "name": "legacy", "output_dir": str(tmp_path), "resume": True}
    old = base | {"dpo": {"lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 1}}}
    new = base | {"dpo": {"adapter": {"kind": "lora", "r": 4, "alpha": 8}, "train": {"max_steps": 1}}}
    assert load_recipe(old) == load_recipe(new)
    assert load_recipe(new)["dpo"]["adapter"] == {"kind": "lora", "r": 4, "alpha": 8}
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "recipe.json").write_text(json.dumps(_merge(DEFAULTS, old)))  # as saved before
    _Stages(load_recipe(new))
    (tmp_path / "legacy" / "recipe.json").write_text(json.dumps(_merge(DEFAULTS, old)))
    with pytest.raises(LmforgeError, match="different recipe"):
        _Stages(load_recipe(base | {"dpo": {"adapter": {"kind": "lora", "r": 8, "alpha": 8},
                                            "train": {"max_steps": 1}}}))
