"""Imports only go down the layers, and task classes live in tasks/.

The layers (higher may import lower or the same layer, never higher)::

    5  cli, __main__, commands/            parse arguments, call the API, print
    4  lmforge (package), api, compare, demo, serve/, factuality/   the public Python API and what is built on it
    3  tasks/                              one module per task, the task registry
    2  train/, eval/, embeddings/, generation, sampling, causal_lm, merge, topics/, search/, report/, inspection/,
       prompting/                          engines, evaluators and the applications' libraries
    1  config, rundir, device, models, progress, fingerprint, data/, adapters/, losses/, quant/
    0  errors

Every ``import`` counts, at module level or inside a function (lazy imports are still
dependencies); only ``if TYPE_CHECKING:`` blocks are left out. A module this table does not
place fails the test: add it here and to ARCHITECTURE.md.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"

LAYERS: dict[str, int] = {
    "lmforge.errors": 0,
    "lmforge.config": 1, "lmforge.rundir": 1, "lmforge.device": 1, "lmforge.models": 1, "lmforge.data": 1,
    "lmforge.adapters": 1, "lmforge.losses": 1, "lmforge.quant": 1, "lmforge.progress": 1,
    "lmforge.fingerprint": 1, "lmforge.unpad": 1, "lmforge.unpad_kernels": 1, "lmforge.fast_dropout": 1, "lmforge.cpu_kernels": 1, "lmforge.bf16_weights": 1, "lmforge.int8_frozen": 1, "lmforge.fast_encode": 1, "lmforge.fast_encode_attention": 1, "lmforge.packed_train": 1, "lmforge.streaming": 1,
    "lmforge.train": 2, "lmforge.eval": 2, "lmforge.embeddings": 2, "lmforge.generation": 2, "lmforge.kv_cache": 2, "lmforge.packed_linears": 2, "lmforge.prompt_ids": 2,
    "lmforge.sampling": 2, "lmforge.merge": 2, "lmforge.causal_lm": 2, "lmforge.topics": 2, "lmforge.search": 2, "lmforge.report": 2,
    "lmforge.inspection": 2, "lmforge.prompting": 2, "lmforge.rl": 2,
    "lmforge.tasks": 3,
    "lmforge": 4, "lmforge.api": 4, "lmforge.compare": 4, "lmforge.demo": 4, "lmforge.serve": 4,
    "lmforge.factuality": 4, "lmforge.rl.detox": 4,
    "lmforge.cli": 5, "lmforge.__main__": 5, "lmforge.commands": 5,
}
NAMES = {0: "errors", 1: "building blocks", 2: "engines/evaluators", 3: "tasks", 4: "api", 5: "commands"}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(mod: str) -> int | None:
    """The layer of the longest entry of LAYERS that is ``mod`` or a package containing it."""
    if mod == "lmforge":
        return LAYERS[mod]
    parts = mod.split(".")
    for i in range(len(parts), 1, -1):
        key = ".".join(parts[:i])
        if key in LAYERS:
            return LAYERS[key]
    return None


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, lmforge module)`` for every import of ``path`` (relative ones resolved)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[int, str]] = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                out.extend((child.lineno, a.name) for a in child.names if a.name.split(".")[0] == "lmforge")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] != "lmforge":
                    continue
                # `from . import x` / `from .pkg import mod`: the imported names may be modules
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    out.append((child.lineno, sub if (SRC.parent / sub.replace(".", "/")).with_suffix(".py").is_file()
                                or (SRC.parent / sub.replace(".", "/")).is_dir() else target))
            visit(child)

    visit(tree)
    return out


def all_modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def violations() -> list[str]:
    found = []
    for path in all_modules():
        src = module_name(path)
        ls = layer_of(src)
        for line, target in imports_of(path):
            lt = layer_of(target)
            if ls is not None and lt is not None and lt > ls:
                found.append(f"{path.relative_to(SRC.parent)}:{line}: {src} ({NAMES[ls]}) imports {target} "
                             f"({NAMES[lt]})")
    return found


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in all_modules() if layer_of(module_name(p)) is None]
    assert not unplaced, f"modules without a layer (add them to LAYERS and ARCHITECTURE.md): {unplaced}"


def test_imports_only_go_down():
    found = violations()
    assert not found, "upward imports:\n" + "\n".join(found)


def test_task_classes_live_in_tasks():
    """A class deriving from a task class (``lmforge.tasks...``) is defined inside ``tasks/``."""
    found = []
    for path in all_modules():
        src = module_name(path)
        if src.startswith("lmforge.tasks"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        from_tasks = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                      and n.module and "tasks" in n.module.split(".") for a in n.names}
        for n in ast.walk(tree):
            if isinstance(n, ast.ClassDef) and any(isinstance(b, ast.Name) and b.id in from_tasks for b in n.bases):
                found.append(f"{path.relative_to(SRC.parent)}:{n.lineno}: class {n.name}")
    assert not found, "task classes outside tasks/:\n" + "\n".join(found)


def test_no_import_cycles_among_task_modules():
    """The task modules form a DAG (lazy imports included): no module needs one that needs it."""
    graph: dict[str, set[str]] = {}
    for path in sorted((SRC / "tasks").glob("*.py")):
        src = module_name(path)
        graph[src] = {t for _, t in imports_of(path) if t.startswith("lmforge.tasks.") and t != src}
    seen, stack, cycles = set(), [], []

    def dfs(node):
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            dfs(nxt)
        stack.pop()

    for node in sorted(graph):
        dfs(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The test can fail: a lower module importing a higher one is reported."""
    fake = SRC / "embeddings" / "encoder.py"
    text = fake.read_text(encoding="utf-8") + "\n\ndef _f():\n    from ..tasks.base import Task\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if self == fake else
                        Path.read_bytes(self).decode(k.get("encoding") or "utf-8"))
    assert any("lmforge.embeddings.encoder (engines/evaluators) imports lmforge.tasks.base" in v
               for v in violations())


@pytest.mark.parametrize("mod, layer", [("lmforge.tasks.sft", 3), ("lmforge.commands.core", 5),
                                        ("lmforge.rundir", 1), ("lmforge", 4)])
def test_layer_lookup(mod, layer):
    assert layer_of(mod) == layer
