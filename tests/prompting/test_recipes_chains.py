"""Prompt recipes, chains (cycle detection, intermediates), reasoning helpers and chat memory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.prompting.chains import Chain, find_cycle, load_chain, run_chain
from lmforge.prompting.memory import ChatMemory, parse_memory
from lmforge.prompting.reasoning import answer_questions, extract_answer, majority, tree_of_thought
from lmforge.prompting.recipe import load_recipe, recipe_from_dict, render_messages, run_recipe


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_recipe_renders_components_in_order_with_examples(tmp_path):
    shots = _write(tmp_path / "shots.jsonl", "\n".join(json.dumps(r) for r in [
        {"text": "great film", "label": "positive"}, {"text": "dull plot", "label": "negative"}]))
    r = recipe_from_dict({"persona": "You are a critic.", "tone": "dry", "instruction": "Classify.",
                          "data": "Review: {text}", "format": "One word.",
                          "examples": {"file": str(shots), "k": 2, "output": "label"}})
    from lmforge.prompting.recipe import select_examples

    msgs = render_messages(r, {"text": "fine"}, select_examples(r, [{"text": "fine"}])[0])
    assert msgs[0] == {"role": "system", "content": "You are a critic.\nTone: dry"}
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[2]["content"] == "positive" and msgs[-1]["content"] == "Classify.\n\nReview: fine\n\nOne word."


def test_recipe_undefined_variable_is_one_line(tmp_path):
    r = recipe_from_dict({"instruction": "Summarise {dialogue}"}, "r.yaml")
    with pytest.raises(LmforgeError, match=r"r.yaml: instruction uses \{dialogue\}, which input 1 does not have"):
        render_messages(r, {"text": "x"}, [], "input 1")
    for bad, msg in [({"persona": "x"}, "at least one"), ({"instruction": "a {0}"}, "not a field name"),
                     ({"instruction": "a {b"}, "bad template"), ({"instruction": "a", "colour": 1}, "colour"),
                     ({"instruction": "a", "output": {"regex": "(", "choice": ["a"]}}, None)]:
        if msg is None:
            with pytest.raises(LmforgeError, match="exactly one"):
                recipe_from_dict(bad).constraint()
        else:
            with pytest.raises(LmforgeError, match=msg):
                recipe_from_dict(bad)
    with pytest.raises(LmforgeError, match="bad.yaml: line 1 malformed YAML"):
        load_recipe(_write(tmp_path / "bad.yaml", "instruction: [unclosed"))


def test_recipe_with_choice_output_runs_on_tiny_model(tiny_lm, tiny_tok):
    r = recipe_from_dict({"instruction": "Is {text} good?", "output": {"choice": ["yes", "no"]},
                          "generation": {"max_new_tokens": 4, "temperature": 1.0, "seed": 0}})
    rows = run_recipe(tiny_lm, tiny_tok, r, [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    assert all(row["output"] in ("yes", "no") and row["valid"] for row in rows)


def test_find_cycle_and_chain_errors(tmp_path):
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["a"]}) == ["a", "a"]
    assert find_cycle({"a": [], "b": ["a"], "c": ["a", "b"]}) is None
    cyc = _write(tmp_path / "c.yaml", "steps:\n  - {name: title, prompt: 'Title for {story}'}\n"
                                      "  - {name: story, prompt: 'Story called {title}'}\n")
    with pytest.raises(LmforgeError, match=r"c.yaml: the steps form a cycle: title -> story -> title"):
        load_chain(cyc)
    for text, msg in [("steps: []", "non-empty 'steps'"), ("steps:\n  - {name: a}", "either 'prompt' or 'recipe'"),
                      ("steps:\n  - {name: a, prompt: x}\n  - {name: a, prompt: y}", "used twice"),
                      ("steps:\n  - {name: 1a, prompt: x}", "identifier"),
                      ("steps:\n  - {name: a, prompt: x, colour: 2}", "unknown key 'colour'")]:
        with pytest.raises(LmforgeError, match=msg):
            load_chain(_write(tmp_path / "x.yaml", text))


def test_chain_runs_in_dependency_order_and_saves_every_step(tmp_path, tiny_lm, tiny_tok):
    path = _write(tmp_path / "story.yaml", "\n".join([
        "steps:",
        "  - {name: story, prompt: 'Story titled {title} about {summary}', max_new_tokens: 6}",
        "  - {name: summary, prompt: 'Summarise {idea}', max_new_tokens: 5}",
        "  - {name: title, prompt: 'Title for {summary}', max_new_tokens: 4}"]))
    chain = load_chain(path)
    assert chain.order == ["summary", "title", "story"]
    with pytest.raises(LmforgeError, match="neither a step nor a field"):
        chain.check_inputs([{"topic": "x"}], lambda i: f"line {i + 1}")
    out = tmp_path / "out"
    report = run_chain(tiny_lm, tiny_tok, chain, [{"idea": "a cat"}, {"idea": "a dog"}], out)
    assert report["steps"] == ["summary", "title", "story"]
    rows = [json.loads(x) for x in (out / "chain.jsonl").read_text().splitlines()]
    assert [set(r) for r in rows] == [{"idea", "summary", "title", "story"}] * 2
    for step in ("summary", "title", "story"):
        saved = [json.loads(x) for x in (out / "steps" / f"{step}.jsonl").read_text().splitlines()]
        assert len(saved) == 2 and all("prompt" in s and "output" in s for s in saved)
    title_prompt = json.loads((out / "steps" / "title.jsonl").read_text().splitlines()[0])["prompt"]
    assert rows[0]["summary"] in title_prompt[-1]["content"]


def test_chain_with_missing_field_writes_nothing(tmp_path, tiny_lm, tiny_tok):
    chain = Chain([("a", recipe_from_dict({"instruction": "x {nope}"}))], "c.yaml")
    with pytest.raises(LmforgeError):
        run_chain(tiny_lm, tiny_tok, chain, [{"idea": 1}], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, kind, want", [
    ("3 + 4 = 7. The answer is 7.", "number", "7"), ("so the answer is 1,200 apples", "number", "1200"),
    ("Answer: 12.50", "number", "12.5"), ("He has 5 and then 9 more, 14 total", "number", "14"),
    ("no idea", "number", None), ("The answer is (B) library", "choice", "B"),
    ("I pick C. because", "choice", "C"), ("nothing", "choice", None)])
def test_extract_answer(text, kind, want):
    assert extract_answer(text, kind) == want


def test_majority_vote_and_agreement():
    assert majority(["7", "8", "7", None]) == ("7", 0.5)
    assert majority(["8", "7", "7", "8"]) == ("8", 0.5)  # tie: the first to appear
    assert majority([None, None]) == (None, 0.0)


def test_self_consistency_and_tree_of_thought_run(tiny_lm, tiny_tok):
    out = answer_questions(tiny_lm, tiny_tok, ["2+2?", "3+3?"], method="sc", k=3, max_new_tokens=6)
    assert [len(a.samples) for a in out] == [3, 3] and all(a.tokens > 0 for a in out)
    assert all(0.0 <= a.agreement <= 1.0 for a in out)
    tot = tree_of_thought(tiny_lm, tiny_tok, "2+2?", breadth=2, branch=2, depth=2, max_step_tokens=5)
    assert 1 <= len(tot["tree"]) <= 8 and all(1 <= n["rating"] <= 5 for n in tot["tree"])


def _words(msgs):
    return sum(len(m["content"].split()) + 2 for m in msgs)


def _chat(mem: ChatMemory, n: int) -> None:
    for i in range(n):
        mem.add("user", f"question {i} " + "word " * 5)
        mem.messages()
        mem.add("assistant", f"answer {i} " + "word " * 5)


@pytest.mark.parametrize("spec", ["full", "window:2", "summary"])
def test_memory_respects_budget(spec):
    mem = ChatMemory(spec, _words, budget=40, summarise=lambda text: "they talked about questions")
    _chat(mem, 10)
    mem.add("user", "last question")
    msgs = mem.messages()
    assert _words(msgs) <= 40 and msgs[-1]["content"] == "last question"
    if spec == "window:2":
        assert [m["content"].split()[1] for m in msgs[:-1]] == ["8", "8", "9", "9"]
    if spec == "summary":
        assert msgs[0]["role"] == "system" and "they talked" in msgs[0]["content"]
    assert "turns kept" in mem.show()


def test_memory_bad_specs_and_oversized_message():
    for spec in ["window", "window:0", "window:x", "all", "summary:3"]:
        with pytest.raises(LmforgeError, match="--memory"):
            parse_memory(spec)
    mem = ChatMemory("full", _words, budget=5)
    mem.add("user", "a very long message that cannot fit at all")
    with pytest.raises(LmforgeError, match="budget"):
        mem.messages()


def test_similar_examples_are_the_nearest_by_the_encoder(tmp_path, tiny_bert_dir):
    """An input equal to one example's text has that example as its nearest (cosine 1)."""
    from lmforge.prompting.recipe import select_examples

    rows = [{"text": t, "label": str(i)} for i, t in enumerate(
        ["good great fine", "bad awful poor", "movie film plot", "actor story scene"])]
    shots = _write(tmp_path / "shots.jsonl", "\n".join(json.dumps(r) for r in rows))
    r = recipe_from_dict({"data": "{text}", "examples": {"file": str(shots), "k": 2, "select": "similar",
                                                         "encoder": str(tiny_bert_dir), "output": "label"}})
    picked = select_examples(r, [{"text": "bad awful poor"}, {"text": "actor story scene"}])
    assert [p[-1]["label"] for p in picked] == ["1", "3"] and all(len(p) == 2 for p in picked)
