"""The one training engine shared by every task (``fit``), loaded on first use so that
``import lmforge`` stays light."""
from __future__ import annotations

__all__ = ["fit"]


def __getattr__(name: str):
    if name == "fit":
        from .engine import fit

        return fit
    raise AttributeError(f"module 'lmforge.train' has no attribute '{name}'")
