"""User-facing errors: one clear line, a non-zero exit code."""
from __future__ import annotations


class LmforgeError(Exception):
    """An error caused by the user's input (config, data, model reference).

    The CLI prints ``str(err)`` as a single line and exits with ``exit_code``.
    """

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class TrainingError(LmforgeError):
    """The run stopped (e.g. non-finite loss); the last good checkpoint is kept."""

    exit_code = 1
