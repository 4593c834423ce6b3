"""Sequential prompt chains: each step's output feeds named inputs of later steps.

A chain (YAML)::

    steps:
      - name: summary
        prompt: "Summarise this story idea in two sentences: {idea}"
      - name: title
        prompt: "Give a short title for this story: {summary}"
      - name: story
        recipe: story.yaml              # or an inline recipe mapping; its fields may name steps
        max_new_tokens: 200

A step's fields are the input record's fields and the names of other steps; steps run in
dependency order (the file order where it is free), a cycle (``a`` needs ``b`` needs ``a``) is one
error line naming it. Every intermediate is saved: ``OUT/steps/<name>.jsonl`` (prompt and output
per record) and ``OUT/chain.jsonl`` (each record with every step's output); the folder appears
whole or not at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LmforgeError
from .recipe import PromptRecipe, load_recipe, recipe_from_dict


def _step_recipe(raw: dict, i: int, source: str, base: Path) -> tuple[str, PromptRecipe]:
    if not isinstance(raw, dict):
        raise LmforgeError(f"{source}: steps[{i}] must be a mapping with 'name' and 'prompt' or 'recipe'")
    name = raw.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise LmforgeError(f"{source}: steps[{i}]: 'name' must be an identifier, got {name!r}")
    unknown = set(raw) - {"name", "prompt", "recipe", "max_new_tokens", "temperature"}
    if unknown:
        raise LmforgeError(f"{source}: steps[{i}] ({name}): unknown key '{sorted(unknown)[0]}'")
    where = f"{source}: step '{name}'"
    if ("prompt" in raw) == ("recipe" in raw):
        raise LmforgeError(f"{where}: give either 'prompt' or 'recipe'")
    if "prompt" in raw:
        if not isinstance(raw["prompt"], str) or not raw["prompt"].strip():
            raise LmforgeError(f"{where}: 'prompt' must be non-empty text")
        recipe = recipe_from_dict({"instruction": raw["prompt"]}, where)
    elif isinstance(raw["recipe"], dict):
        recipe = recipe_from_dict(raw["recipe"], where)
    else:
        path = Path(str(raw["recipe"]))
        recipe = load_recipe(path if path.is_absolute() or path.exists() else base / path)
    gen = recipe.generation.model_copy(update={k: raw[k] for k in ("max_new_tokens", "temperature") if k in raw})
    return name, recipe.model_copy(update={"generation": gen})


def find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as a path ``[a, b, ..., a]``, or None (depth-first search, 3 colours)."""
    colour = {n: 0 for n in deps}  # 0 new, 1 on the current path, 2 done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        path.append(n)
        for d in deps[n]:
            if colour[d] == 1:
                return path[path.index(d):] + [d]
            if colour[d] == 0 and (c := visit(d)):
                return c
        path.pop()
        colour[n] = 2
        return None

    for n in deps:
        if colour[n] == 0 and (c := visit(n)):
            return c
    return None


class Chain:
    """Parsed chain: steps in run order, each with its recipe and the steps it reads."""

    def __init__(self, steps: list[tuple[str, PromptRecipe]], source: str):
        self.source = source
        names = [n for n, _ in steps]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise LmforgeError(f"{source}: step name '{dup}' is used twice")
        self.recipes = dict(steps)
        self.deps = {n: [f for fs in r.fields().values() for f in fs if f in self.recipes] for n, r in steps}
        cycle = find_cycle(self.deps)
        if cycle:
            raise LmforgeError(f"{source}: the steps form a cycle: {' -> '.join(cycle)}")
        order, done = [], set()
        while len(order) < len(names):  # stable topological order
            n = next(n for n in names if n not in done and all(d in done for d in self.deps[n]))
            order.append(n)
            done.add(n)
        self.order = order

    def check_inputs(self, records: list[dict], where) -> None:
        for i, rec in enumerate(records):
            clash = next((n for n in self.order if n in rec), None)
            if clash:
                raise LmforgeError(f"{where(i)}: field '{clash}' has the name of a chain step; rename one")
            for n in self.order:
                for part, fs in self.recipes[n].fields().items():
                    missing = next((f for f in fs if f not in rec and f not in self.recipes), None)
                    if missing:
                        raise LmforgeError(f"{self.source}: step '{n}' ({part}) uses {{{missing}}}, which is "
                                           f"neither a step nor a field of {where(i)}")


def load_chain(path: str | Path) -> Chain:
    from ..config import read_yaml

    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"{p}: chain not found")
    raw: Any = read_yaml(p)  # one line for non-UTF-8, malformed YAML, duplicate keys, alias bombs
    if not isinstance(raw, dict) or not isinstance(raw.get("steps"), list) or not raw["steps"]:
        raise LmforgeError(f"{p}: a chain is a mapping with a non-empty 'steps' list")
    extra = set(raw) - {"steps"}
    if extra:
        raise LmforgeError(f"{p}: unknown key '{sorted(extra)[0]}'")
    return Chain([_step_recipe(s, i, str(p), p.parent) for i, s in enumerate(raw["steps"])], str(p))


def run_chain(model, tokenizer, chain: Chain, records: list[dict], out: str | Path, *, where=None,
              base: Path | None = None) -> dict:
    """Run every step over every record and write ``out`` (see the module docstring)."""
    from ..rundir import atomic_dir, write_jsonl
    from .recipe import run_recipe

    where = where or (lambda i: f"input {i + 1}")
    if not records:
        raise LmforgeError("chain: no input records")
    chain.check_inputs(records, where)
    state = [dict(r) for r in records]
    saved: dict[str, list[dict]] = {}
    for name in chain.order:
        rows = run_recipe(model, tokenizer, chain.recipes[name], state, where=where, base=base)
        for rec, row in zip(state, rows):
            rec[name] = row["output"].strip()
        saved[name] = rows
    with atomic_dir(out) as tmp:
        for name, rows in saved.items():
            write_jsonl(tmp / "steps" / f"{name}.jsonl", rows)
        write_jsonl(tmp / "chain.jsonl", state)
    return {"out": str(out), "records": len(state), "steps": chain.order}
