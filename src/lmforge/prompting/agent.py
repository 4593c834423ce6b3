"""ReAct agents (Yao et al. 2023): Thought / Action / Observation until a Final Answer.

The tool list and the format go into the system prompt; the model writes a thought and an action
(``Action: tool[input]``), generation stops at ``Observation:``, lmforge runs the tool and appends
its result, and the loop repeats, at most ``max_steps`` times. Small models slip on the format,
so :func:`parse_step` is tolerant (case, ``tool(x)``, ``tool: x``, ``Action Input:``, markdown
stars, a bare expression when there is a single tool); a step it still cannot read becomes an
observation telling the model the format, and counts as malformed (``recovered`` when a later step
parses). With ``constrain=True`` the step is instead decoded under a regex of the format itself,
so it always parses. Several questions run in lockstep (one batched generation per step).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from .tools import Tool, ToolError

SYSTEM_TOOLS = ("Answer the user's question. You can use these tools:\n{tools}\n"
                "Use exactly this format:\n"
                "Thought: what to do next\nAction: tool_name[input]\nObservation: the tool's result\n"
                "... (Thought, Action and Observation can repeat)\n"
                "Thought: I know the answer\nFinal Answer: the answer")
SYSTEM_NO_TOOLS = ("Answer the user's question. Use exactly this format:\n"
                   "Thought: your reasoning\nFinal Answer: the answer")
DEMO_NO_TOOLS = ("Question: A box holds 12 eggs. How many eggs are in 4 boxes?\n"
                 "Thought: 4 boxes of 12 eggs are 12 * 4 = 48 eggs.\nFinal Answer: 48")
FORMAT_HINT = "Invalid format. Write 'Action: tool_name[input]' or 'Final Answer: the answer'."


@dataclasses.dataclass
class Step:
    kind: str  # "action", "final" or "malformed"
    thought: str = ""
    tool: str | None = None
    input: str = ""
    answer: str = ""
    error: str = ""


_FINAL = re.compile(r"final\s*answer\s*\**\s*[:：]\s*\**\s*(.*)", re.IGNORECASE)
_ACTION = re.compile(r"action\s*\**\s*[:：]\s*\**\s*(.*)", re.IGNORECASE)
_ACTION_INPUT = re.compile(r"action\s*input\s*\**\s*[:：]\s*(.*)", re.IGNORECASE)
_THOUGHT = re.compile(r"thought\s*\**\s*[:：]\s*(.*)", re.IGNORECASE)
_CALL = re.compile(r"^([A-Za-z_][\w.-]*)\s*(?:\[(.*)\]|\((.*)\)|:\s*(.+)|\s+(.+))?\s*$", re.DOTALL)


def _strip(s: str) -> str:
    return s.strip().strip("*`").strip()


def parse_step(text: str, tools: Sequence[Tool]) -> Step:
    """Read one model turn: a final answer, a tool call, or malformed (with the reason)."""
    names = {t.name.lower(): t.name for t in tools}
    thought = _strip(m.group(1).splitlines()[0]) if (m := _THOUGHT.search(text)) else ""
    final, action = _FINAL.search(text), _ACTION.search(text)
    if action and _ACTION_INPUT.match(text, action.start()):
        action = None  # "Action Input:" alone, without a named action
    if final and (not action or final.start() < action.start()):
        answer = _strip(final.group(1).splitlines()[0] if final.group(1).strip() else "")
        return Step("final", thought, answer=answer) if answer else Step("malformed", thought, error="empty answer")
    if action is None:
        for line in text.splitlines():  # a bare call such as "calculator[2+3]"
            m = _CALL.match(_strip(line))
            if m and m.group(1).lower() in names and any(m.group(i) for i in (2, 3)):
                return Step("action", thought, names[m.group(1).lower()], _strip(m.group(2) or m.group(3)))
        return Step("malformed", thought, error="no Action or Final Answer")
    body = _strip(action.group(1))
    rest = text[action.end():]
    m = _CALL.match(body)
    if m and m.group(1).lower() in names:
        arg = next((g for g in m.groups()[1:] if g), "")
        if not arg and (mi := _ACTION_INPUT.search(rest)):
            arg = mi.group(1).splitlines()[0] if mi.group(1) else ""
        if not _strip(arg):
            return Step("malformed", thought, error=f"no input for {names[m.group(1).lower()]}")
        return Step("action", thought, names[m.group(1).lower()], _strip(arg))
    if len(tools) == 1 and body:  # "Action: 3 + 4" with a single tool
        return Step("action", thought, tools[0].name, body)
    first = body.split("[")[0].split("(")[0].strip() or "(nothing)"
    return Step("malformed", thought, error=f"unknown tool '{first}'")


def action_regex(tools: Sequence[Tool]) -> str:
    """The format of one step as a regex, for constrained decoding of actions. Lengths are left
    open (a bounded ``{1,160}`` would multiply the automaton's states); the decoding budget ends
    each part in time."""
    names = "|".join(re.escape(t.name) for t in tools)
    final = r"Final Answer: [^\n]+"
    act = rf"Action: ({names})\[[^\]\n]+\]" if tools else None
    return r"Thought: [^\n]+\n" + (f"({act}|{final})" if act else final)


def run_tool(step: Step, tools: Sequence[Tool]) -> str:
    """The observation for an action: the tool's output, or its error (a tool that raises does
    not stop the agent)."""
    tool = next(t for t in tools if t.name == step.tool)
    try:
        return str(tool.run(step.input))[:1000]
    except ToolError as exc:
        return f"Error: {exc}"
    except Exception as exc:  # noqa: BLE001 - any failure of a user's tool is shown to the model
        return f"Error: {type(exc).__name__}: {exc}"


def run_agents(model, tokenizer, questions: Sequence[str], tools: Sequence[Tool], *, max_steps: int = 5,
               max_new_tokens: int = 96, constrain: bool = False, temperature: float = 0.0,
               seed: int = 0, batch_size: int = 8) -> list[dict]:
    """Run one ReAct agent per question (batched per step).

    Returns:
        Per question ``{"question", "answer", "steps", "malformed", "recovered", "stopped",
        "transcript": [{"step", "output", "parsed", "observation"}], "prompt"}``.
    """
    from ..generation import GenerationConfig, generate, render_chat
    from .constrained import Constraint

    listing = "\n".join(f"- {t.name}: {t.description}" for t in tools)
    system = SYSTEM_TOOLS.format(tools=listing) if tools else SYSTEM_NO_TOOLS
    demo = next((t.demo for t in tools if t.demo), None) if tools else DEMO_NO_TOOLS
    if demo:
        system += f"\n\nExample:\n{demo}"
    heads = [render_chat(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": q}])
             for q in questions]
    pads = [""] * len(questions)
    runs = [{"question": q, "answer": None, "steps": 0, "malformed": 0, "recovered": 0, "stopped": "step limit",
             "transcript": []} for q in questions]
    active = list(range(len(questions)))
    constraint = Constraint.regex(action_regex(tools)) if constrain else None
    max_pos = getattr(model.config, "max_position_embeddings", None)
    for step_no in range(1, max_steps + 1):
        if max_pos:  # an agent whose scratchpad fills the context stops there
            for i in [i for i in active if len(tokenizer(heads[i] + pads[i])["input_ids"]) + max_new_tokens + 4 > max_pos]:
                runs[i]["stopped"] = "context full"
                active.remove(i)
        if not active:
            break
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + step_no,
                               stop=[] if constrain else ["Observation:", "\nObservation"],
                               batch_size=batch_size)
        prompts = [heads[i] + pads[i] + ("" if constrain else "Thought:") for i in active]
        if constraint is not None:
            prompts = [heads[i] + pads[i] for i in active]
            bound = constraint.bind(model, tokenizer, max_new_tokens)
            outs = generate(model, tokenizer, prompts, cfg, chat=False, constraint=bound)
        else:
            outs = ["Thought:" + o for o in generate(model, tokenizer, prompts, cfg, chat=False)]
        still = []
        for i, out in zip(active, outs):
            run = runs[i]
            run["steps"] = step_no
            step = parse_step(out, tools)
            entry = {"step": step_no, "output": out, "parsed": dataclasses.asdict(step), "observation": None}
            run["transcript"].append(entry)
            if step.kind == "final":
                run["answer"], run["stopped"] = step.answer, "final answer"
                run["recovered"] = run["malformed"]
                continue
            if step.kind == "action":
                run["recovered"] = run["malformed"]
                obs = run_tool(step, tools)
                text = out.split("Observation")[0].rstrip()
            else:
                run["malformed"] += 1
                obs = f"{FORMAT_HINT} ({step.error})"
                text = out.rstrip()
            entry["observation"] = obs
            pads[i] += f"{text}\nObservation: {obs}\n"
            still.append(i)
        active = still
    for i, run in enumerate(runs):
        run["prompt"] = heads[i]
    return runs
