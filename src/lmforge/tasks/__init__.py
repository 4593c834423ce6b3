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
    "rl": "lmforge.tasks.rl",
    "embed": "lmforge.tasks.embed",
    "augsbert": "lmforge.tasks.augsbert",
    "mlm": "lmforge.tasks.mlm",
    "ner": "lmforge.tasks.ner",
    "topics": "lmforge.tasks.topics",
    "retriever": "lmforge.tasks.retriever",
}


def _register_all() -> None:
    for mod in TASK_MODULES.values():
        importlib.import_module(mod)  # each module's @register_task line registers it


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
    from ..models import check_config_fits

    check_config_fits(cfg)  # e.g. data.max_length beyond the model's positions, before any run folder exists
    task = task_class(cfg.task, cfg)(cfg, **kwargs)
    from ..train.engine import check_best_metric

    check_best_metric(task, cfg)  # an unknown train.best_metric, before any run folder exists
    return task


def load_task(run_dir, checkpoint: str = "final") -> Task:
    """The task of a finished run, ready to evaluate/predict.

    ``checkpoint``: ``final``, ``best``, or ``step-N`` (the final artefact with the trainable
    weights saved at step N put in place: adapter matrices, heads, or every weight of a full
    fine-tune).
    """
    from ..rundir import open_run

    opened = open_run(run_dir, checkpoint)
    cls = task_class(opened.config.task, opened.config)
    if opened.kind != "checkpoint":
        return cls.from_run(run_dir, opened.checkpoint)
    task = cls.from_run(run_dir, "final")
    _load_step_weights(task, opened)
    return task


def _load_step_weights(task: Task, opened) -> None:
    import torch

    from ..errors import LmforgeError

    weights = opened.step_weights()
    params = dict(task.model.named_parameters())
    unknown = [k for k in weights if k not in params]
    if unknown:
        path = opened.root / "trainable.safetensors"
        raise LmforgeError(f"{path}: the checkpoint does not match the run's saved model (parameter {unknown[0]})")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))


__all__ = ["TASKS", "TASK_MODULES", "Task", "build_task", "load_task", "register_task", "task_class",
           "task_names"]

_register_all()
