"""The one training engine shared by every task."""
from .engine import fit

__all__ = ["fit"]
