"""Tools an agent may call: a safe calculator, search over an lmforge index, and user functions.

A tool is a name, a one-line description (shown to the model) and ``run(text) -> str``. A tool
that raises does not end the run: the agent shows the error to the model as its observation.
User tools are Python functions named by dotted path (``package.module.function``); they are code,
so only the user's own command line (``--tools py:package.module.function``) enables them, never a
file handed to lmforge.
"""
from __future__ import annotations

import ast
import importlib
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LmforgeError


class ToolError(Exception):
    """A tool could not do what was asked; the message becomes the observation."""


@dataclass
class Tool:
    """A tool: its name, a one-line description, ``run(text) -> str``, and optionally a worked
    ReAct example (small models copy an example far better than a format with placeholders)."""

    name: str
    description: str
    run: Callable[[str], str]
    demo: str | None = None


# ---- calculator: an AST walk over arithmetic only -----------------------------------------------
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_LEN, _MAX_POW, _MAX_ABS = 200, 100, 1e100


def _walk(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > _MAX_POW or abs(left) > 1e6):
            raise ToolError("exponent too large")
        try:
            value = _BIN[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(value, complex) or abs(value) > _MAX_ABS:
            raise ToolError("result out of range")
        return value
    raise ToolError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")


def calculate(expression: str) -> str:
    """Evaluate arithmetic safely (parsed to an AST and walked; never ``eval``).

    Accepts ``x``/``×`` for times, ``÷`` for divide, ``^`` for power, thousands separators.
    """
    text = expression.strip().strip("`'\"").strip()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    text = text.replace("×", "*").replace("÷", "/").replace("^", "**")
    text = re.sub(r"(?<=[\d)\s])[xX](?=[\s\d(])", "*", text).rstrip("=").strip()
    text = text.split("=")[0].strip()  # "974 - 588 = 386": the expression is left of the first '='

    if not text:
        raise ToolError("empty expression")
    if len(text) > _MAX_LEN:
        raise ToolError(f"expression longer than {_MAX_LEN} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression.strip()!r}") from None
    value = _walk(tree)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    return str(round(value, 10) if isinstance(value, float) else value)


CALCULATOR = Tool("calculator", "evaluates arithmetic, e.g. calculator[(12 + 7) * 3]", calculate,
                  demo="Question: A box holds 12 eggs. How many eggs are in 4 boxes?\n"
                       "Thought: I multiply 12 by 4.\nAction: calculator[12 * 4]\nObservation: 48\n"
                       "Thought: I know the answer.\nFinal Answer: 48")


# ---- search over an lmforge index -----------------------------------------------------------------
def search_tool(index_path: str, k: int = 3) -> Tool:
    """Hybrid search over the index folder at ``index_path`` (built by ``lmforge index``)."""
    from ..search import SearchIndex, SearchOptions, search

    index = SearchIndex.load(index_path)
    opts = SearchOptions(mode="hybrid", k=k)

    def run(query: str) -> str:
        if not query.strip():
            raise ToolError("empty query")
        found = search(index, [query.strip()], opts)[0]
        return "\n".join(f"[{h['rank']}] {h['text']}" for h in found) or "no results"

    return Tool("search", f"searches the documents of {index_path}, e.g. search[who wrote Hamlet]", run)


# ---- user tools -----------------------------------------------------------------------------------
def user_tool(dotted: str) -> Tool:
    """A user's Python function ``package.module.function`` (str -> anything printable)."""
    module, _, name = dotted.rpartition(".")
    if not module or not name.isidentifier():
        raise LmforgeError(f"tool 'py:{dotted}': give a dotted name package.module.function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise LmforgeError(f"tool 'py:{dotted}': cannot import ({exc})") from None
    if not callable(fn):
        raise LmforgeError(f"tool 'py:{dotted}': not a function")
    doc = (fn.__doc__ or "").strip().splitlines()
    return Tool(name, doc[0] if doc else f"the user's function {dotted}", lambda text: str(fn(text)))


def build_tools(spec: str | list[str]) -> list[Tool]:
    """Tools from a command-line spec: ``calculator``, ``search:INDEX``, ``py:pkg.mod.func``,
    comma-separated (or a list)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    tools: list[Tool] = []
    for item in items:
        kind, _, arg = item.partition(":")
        if kind == "calculator" and not arg:
            tools.append(CALCULATOR)
        elif kind == "search":
            if not arg:
                raise LmforgeError("tool 'search' needs an index folder: search:INDEX")
            tools.append(search_tool(arg))
        elif kind == "py":
            tools.append(user_tool(arg))
        else:
            raise LmforgeError(f"unknown tool '{item}' (calculator, search:INDEX, py:package.module.function)")
    names = [t.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise LmforgeError(f"tool '{dup}' given twice")
    return tools
