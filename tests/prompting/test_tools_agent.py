"""Calculator safety, tool registry, the tolerant ReAct parser, and an agent run end to end."""
from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.prompting.agent import action_regex, parse_step, run_agents, run_tool
from lmforge.prompting.tools import CALCULATOR, Tool, ToolError, build_tools, calculate


@pytest.mark.parametrize("expr, value", [("2 + 3 * 4", "14"), ("(12 + 7) * 3", "57"), ("7 / 2", "3.5"),
                                         ("2 ** 10", "1024"), ("-3 + +5", "2"), ("1,200 + 5", "1205"),
                                         ("6 x 7", "42"), ("9 ÷ 3", "3"), ("2^3", "8"), ("17 // 5 + 17 % 5", "5"),
                                         ("`4 * 2`", "8"), ("10 - 2.5 =", "7.5"), ("0.1 + 0.2", "0.3"),
                                         ("974 - 588 = 120", "386")])
def test_calculator_values(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr", ["__import__('os').system('echo hi')", "open('x')", "a + 1", "[1, 2]",
                                  "(lambda: 1)()", "1 if 1 else 2", "2 ** 1000000", "9 ** 9 ** 9", "1 / 0",
                                  "'a' * 3", "().__class__", "1 < 2", "", "1" * 300, "10 ** 200 * 10 ** 200"])
def test_calculator_refuses_everything_but_arithmetic(expr):
    with pytest.raises(ToolError):
        calculate(expr)


def test_calculator_never_calls_eval(monkeypatch):
    import builtins

    def boom(*a, **k):
        raise AssertionError("eval called")

    monkeypatch.setattr(builtins, "eval", boom)
    assert calculate("3 * (4 + 5)") == "27"


def test_tool_registry_and_bad_names():
    assert [t.name for t in build_tools("calculator")] == ["calculator"]
    for spec, msg in [("bogus", "unknown tool"), ("calculator,calculator", "twice"), ("search", "index folder"),
                      ("py:nomodule_xyz.fn", "cannot import"), ("py:justname", "dotted name"),
                      ("search:/nonexistent/index", "not found")]:
        with pytest.raises(LmforgeError, match=msg):
            build_tools(spec)
    tool = build_tools("py:os.path.basename")[0]
    assert tool.name == "basename" and tool.run("/a/b.txt") == "b.txt"


TOOLS = [CALCULATOR, Tool("search", "searches", lambda q: "found")]


@pytest.mark.parametrize("text, kind, tool, arg", [
    (" I add.\nAction: calculator[3 + 4]", "action", "calculator", "3 + 4"),
    (" I add.\naction: Calculator(3 + 4)", "action", "calculator", "3 + 4"),
    (" I add.\n**Action:** calculator: 3 + 4", "action", "calculator", "3 + 4"),
    (" x\nAction: calculator\nAction Input: 3 + 4", "action", "calculator", "3 + 4"),
    (" x\nAction: search[who wrote Hamlet]", "action", "search", "who wrote Hamlet"),
    (" compute it\ncalculator[5*5]", "action", "calculator", "5*5"),
    (" done\nFinal Answer: 42", "final", None, ""),
    (" done\nfinal answer: **42 apples**", "final", None, ""),
    (" x\nAction: browse[cats]", "malformed", None, ""),
    (" I think the answer might be big.", "malformed", None, ""),
    (" x\nAction: calculator[]", "malformed", None, ""),
])
def test_parser_tolerates_format_slips(text, kind, tool, arg):
    step = parse_step("Thought:" + text, TOOLS)
    assert step.kind == kind
    if kind == "action":
        assert (step.tool, step.input) == (tool, arg)


def test_parser_single_tool_bare_input_and_final_first():
    step = parse_step("Thought: add\nAction: 3 + 4", [CALCULATOR])
    assert (step.kind, step.tool, step.input) == ("action", "calculator", "3 + 4")
    step = parse_step("Thought: x\nFinal Answer: 7\nAction: calculator[1+1]", [CALCULATOR])
    assert (step.kind, step.answer) == ("final", "7")


def test_tool_that_raises_becomes_an_observation():
    def broken(_):
        raise RuntimeError("disk on fire")

    step = parse_step("Thought: x\nAction: broken[now]", [Tool("broken", "fails", broken)])
    assert run_tool(step, [Tool("broken", "fails", broken)]) == "Error: RuntimeError: disk on fire"
    assert run_tool(parse_step("Action: calculator[1/0]", [CALCULATOR]), [CALCULATOR]) == "Error: division by zero"


def test_action_regex_accepts_the_format_only():
    import re

    rx = action_regex([CALCULATOR])
    assert re.fullmatch(rx, "Thought: add them\nAction: calculator[3 + 4]")
    assert re.fullmatch(rx, "Thought: known\nFinal Answer: 7")
    assert not re.fullmatch(rx, "Thought: add\nAction: search[x]")


def test_agent_runs_with_tiny_model_and_records_transcript(tiny_lm, tiny_tok):
    """A random model writes garbage: the run must still finish within the step limit, with every
    step in the transcript; with constrained actions every step parses."""
    free = run_agents(tiny_lm, tiny_tok, ["What is 3 + 4?", "Two plus two?"], [CALCULATOR], max_steps=3,
                      max_new_tokens=12)
    for run in free:
        assert 1 <= run["steps"] <= 3 and len(run["transcript"]) == run["steps"]
        assert run["malformed"] + sum(e["parsed"]["kind"] != "malformed" for e in run["transcript"]) == run["steps"]
    tight = run_agents(tiny_lm, tiny_tok, ["What is 3 + 4?"], [CALCULATOR], max_steps=3, max_new_tokens=40,
                       constrain=True, temperature=1.0)[0]
    assert tight["malformed"] == 0
    assert all(e["parsed"]["kind"] in ("action", "final") for e in tight["transcript"])


def test_search_tool_over_an_lmforge_index(tiny_bert_dir, tmp_path):
    from lmforge.search import IndexSettings, build_index

    docs = [("d1", "the movie was great fun."), ("d2", "the plot was very dull."), ("d3", "an actor and a scene.")]
    build_index(docs, str(tiny_bert_dir), tmp_path / "idx", IndexSettings(chunking="none"))
    tool = build_tools(f"search:{tmp_path / 'idx'}")[0]
    found = tool.run("dull plot")
    assert tool.name == "search" and found.startswith("[1] ") and "dull" in found
    from lmforge.prompting.agent import Step

    assert run_tool(Step("action", tool="search", input=" "), [tool]) == "Error: empty query"
