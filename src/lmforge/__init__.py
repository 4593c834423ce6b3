"""lmforge: adapt, align and apply language models on the hardware people actually have.

The Python API (see :mod:`lmforge.api`; nothing heavy is imported until it is used)::

    run = lmforge.train("recipe.yaml", name="demo", train={"max_steps": 50})   # -> Run
    run = lmforge.load("runs/demo", checkpoint="best")
    run.evaluate("test.jsonl"); run.predict(["some text"])
    lmforge.encode("minilm", ["a sentence"]); lmforge.generate("smollm2", ["Hi"])
"""
from __future__ import annotations

import types as _types

from . import train as _train_package

_API = ("Run", "encode", "generate", "load", "train_config")


class _TrainPackage(_types.ModuleType):
    """``lmforge.train`` is both the engine package and the API call ``lmforge.train(recipe, **overrides)``."""

    def __call__(self, recipe, **overrides):
        """Train a recipe (YAML path, mapping or RunConfig) with overrides; returns the :class:`~lmforge.api.Run`."""
        from .api import train as _train

        return _train(recipe, **overrides)


_train_package.__class__ = _TrainPackage
train = _train_package


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmforge' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(_API))


__all__ = ["train", *_API]
