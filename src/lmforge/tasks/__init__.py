"""Tasks: each builds its model and data and supplies loss() and evaluate() to the engine.

The one task registry: a task module registers its class with ``@register_task(name, config=...)``
(binding the name, its RunConfig subclass and the class); the modules shipped with lmforge are
listed below and imported when the registry is first used.
"""
from __future__ import annotations

import importlib

from .base import TASKS, Task, register_task

#: built-in task modules (task name -> module); each registers its task(s) on import
TASK_MODULES = {
    "classify": "lmforge.tasks.classify",
    "sft": "lmforge.tasks.sft",
    "preference": "lmforge.tasks.preference",
    "reward": "lmforge.tasks.reward",
    "embed": "lmforge.tasks.embed",
    "augsbert": "lmforge.tasks.augsbert",
    "mlm": "lmforge.tasks.mlm",
    "ner": "lmforge.tasks.ner",
    "topics": "lmforge.tasks.topics",
    "retriever": "lmforge.tasks.retriever",
}


def _register_all() -> None:
    from ..config import TASK_CONFIGS

    for name, mod in TASK_MODULES.items():
        module = importlib.import_module(mod)
        if name not in TASKS and hasattr(module, "TASK") and name in TASK_CONFIGS:  # the older two-part way
            TASKS[name] = module.TASK


def task_names() -> list[str]:
    """Every registered task name."""
    return sorted(TASKS)


def task_class(name: str, cfg=None) -> type[Task]:
    """The class of task ``name``; with a config, the class that runs it (e.g. a classify method)."""
    from ..errors import LmforgeError

    if name not in TASKS:
        raise LmforgeError(f"unknown task '{name}' (choose from {task_names()})")
    cls = TASKS[name]
    return cls.for_config(cfg) if cfg is not None else cls


def build_task(cfg, **kwargs) -> Task:
    """The task that trains ``cfg`` (its data and model read and checked)."""
    return task_class(cfg.task, cfg)(cfg, **kwargs)


def load_task(run_dir, checkpoint: str = "final") -> Task:
    """The task of a finished run (``checkpoint``: final or best), ready to evaluate/predict."""
    from ..rundir import read_config

    cfg = read_config(run_dir)
    return task_class(cfg.task, cfg).from_run(run_dir, checkpoint)


__all__ = ["TASKS", "TASK_MODULES", "Task", "build_task", "load_task", "register_task", "task_class",
           "task_names"]

_register_all()
