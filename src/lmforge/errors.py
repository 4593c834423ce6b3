"""User-facing errors: one clear line, a non-zero exit code."""
from __future__ import annotations


class LmforgeError(Exception):
    """An error caused by the user's input (config, data, model reference).

    The CLI prints ``str(err)`` as a single line and exits with ``exit_code``.
    """

    exit_code: int = 2
    max_length: int = 1000  # a message never repeats an unbounded input (callers cut values; this is the backstop)

    def __init__(self, message: str, exit_code: int | None = None):
        text = " ".join(str(message)[: 4 * self.max_length].split())
        if len(text) > self.max_length:
            text = f"{text[: self.max_length]}... (message cut at {self.max_length} characters)"
        super().__init__(text)
        if exit_code is not None:
            self.exit_code = exit_code


class TrainingError(LmforgeError):
    """The run stopped (e.g. non-finite loss); the last good checkpoint is kept."""

    exit_code = 1
