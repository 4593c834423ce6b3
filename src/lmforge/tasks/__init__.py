"""Tasks: each builds its model and data and supplies loss() and evaluate() to the engine."""
from __future__ import annotations

import importlib

TASK_MODULES = {
    "classify": "lmforge.tasks.classify",
    "sft": "lmforge.tasks.sft",
    "preference": "lmforge.tasks.preference",
    "reward": "lmforge.tasks.reward",
    "embed": "lmforge.tasks.embed",
    "augsbert": "lmforge.tasks.augsbert",
    "mlm": "lmforge.tasks.mlm",
    "ner": "lmforge.tasks.ner",
}


def _register_all() -> None:
    for mod in TASK_MODULES.values():
        importlib.import_module(mod)


def task_class(name: str):
    from ..errors import LmforgeError

    if name not in TASK_MODULES:
        raise LmforgeError(f"unknown task '{name}' (choose from {sorted(TASK_MODULES)})")
    return importlib.import_module(TASK_MODULES[name]).TASK


_register_all()
