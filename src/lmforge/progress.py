"""Progress for people: a tqdm bar on a terminal, one concise line per interval in a log.

A CI log of a long command used to hold hundreds of carriage-return redraws of a bar. Here a bar is
drawn only when the stream is a terminal; otherwise :class:`LineProgress` writes a line such as
``encode 1200/5000 (24%) 0:31 elapsed, ~1:38 left`` once per logging interval and once at the end.
:func:`tracked_tqdm` routes a library's own tqdm loop (transformers' GGUF dequantisation) through the
same rule. Nothing here imports anything above ``errors``.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator


def _fmt_time(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour) for a duration in seconds."""
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def progress_line(desc: str, done: float, total: float | None, elapsed: float, postfix: dict | None = None,
                  unit: str = "", done_here: float | None = None) -> str:
    """One concise progress line: ``desc 120/500 (24%) 0:31 elapsed, ~1:38 left, loss=0.41``.

    The estimate is linear in the units done in this process (``done_here``, default ``done``):
    ``left = elapsed * (total - done) / done_here`` (none before the first unit).
    """
    here = done if done_here is None else done_here
    def num(x):
        if unit == "B":
            return f"{x / 2**20:.1f}MB"
        return f"{int(x)}" if float(x).is_integer() else f"{x:.1f}"

    parts = [desc]
    if total:
        parts.append(f"{num(done)}/{num(total)} ({100.0 * done / total:.0f}%)")
    else:
        parts.append(num(done) + (f" {unit}" if unit and unit != "B" else ""))
    timing = f"{_fmt_time(elapsed)} elapsed"
    if total and here > 0:
        timing += f", ~{_fmt_time(elapsed * max(total - done, 0) / here)} left"
    parts.append(timing)
    if postfix:
        parts.append(" ".join(f"{k}={v}" for k, v in postfix.items()))
    return " ".join(parts[:2]) + " " + ", ".join(parts[2:])


class LineProgress:
    """Progress for logs (no terminal): one line per logging interval instead of bar redraws.

    A line is written on every ``set_postfix`` (the engine calls it once per ``log_every``), on
    ``update`` when ``interval`` seconds have passed since the last line, and once at the end.
    """

    def __init__(self, total: int | None, initial: int = 0, desc: str = "", stream=None, interval: float = 30.0,
                 unit: str = ""):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.t0 = self.last = time.monotonic()
        self.start_n = initial
        self.postfix: dict = {}
        self.closed = False
        self.printed_at = None
        self.pending = False  # a time-based line held back one update (a set_postfix may follow)

    def _emit(self) -> None:
        elapsed = time.monotonic() - self.t0
        # the estimate counts only units done in this process (a resumed run starts at `initial`)
        line = progress_line(self.desc, self.n, self.total, elapsed, self.postfix, self.unit, self.n - self.start_n)
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed stream must not stop the work
            pass
        self.last, self.printed_at = time.monotonic(), self.n

    def update(self, n: float = 1) -> None:
        if self.pending:  # the line held back at the previous update: no set_postfix came for it
            self._emit()
            self.pending = False
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            if self.postfix:  # a caller that sets a postfix (the engine) may do so for this very unit
                self.pending = True
            else:
                self._emit()

    def set_postfix(self, *args, **kwargs) -> None:
        self.postfix = dict(args[0]) if args and isinstance(args[0], dict) else {}
        self.postfix |= kwargs
        self.pending = False  # this line replaces a held-back one for the same unit
        self._emit()

    def close(self) -> None:
        if not self.closed and (self.pending or self.printed_at != self.n):
            self._emit()
        self.pending = False
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Null:
    def update(self, n=1): ...
    def set_postfix(self, *a, **k): ...
    def close(self): ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(total: int | None, initial: int = 0, enabled: bool = True, desc: str = "train", *, stream=None,
             interval: float = 30.0, unit: str = ""):
    """Progress for people: a tqdm bar on a terminal, concise lines in a log, or nothing.

    Args:
        total: units to do (None: unknown; no estimate).
        initial: units already done (a resumed run).
        enabled: False gives a do-nothing stand-in (other DDP ranks, ``progress: false``).
        desc: the label.
        stream: where to write (default stderr); a bar only when it is a terminal.
        interval: without a terminal, seconds between lines written by ``update`` alone.
        unit: ``"B"`` shows bytes as MB; any other text labels the count.
    """
    if not enabled:
        return _Null()
    stream = stream if stream is not None else sys.stderr
    if _is_tty(stream):
        from tqdm.auto import tqdm

        kw = {"unit": "B", "unit_scale": True, "unit_divisor": 1024} if unit == "B" else ({"unit": unit} if unit else {})
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True, file=stream, **kw)
    return LineProgress(total, initial, desc, stream, interval, unit)


class _Tracked:
    """A tqdm-compatible wrapper of an iterable that reports through :func:`progress`."""

    def __init__(self, iterable=None, desc: str | None = None, total: int | None = None, **_ignored):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.bar = progress(total, 0, True, desc=(desc or "progress").rstrip(". "), interval=10.0)

    def __iter__(self):
        try:
            for x in self.iterable:
                yield x
                self.bar.update(1)
        finally:
            self.bar.close()

    def update(self, n=1):
        self.bar.update(n)

    def set_postfix(self, *a, **k):
        ...

    def set_description(self, *a, **k):
        ...

    def close(self):
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


@contextlib.contextmanager
def tracked_tqdm(module) -> Iterator[None]:
    """Inside the block, ``module.tqdm`` (a library's ``from tqdm.auto import tqdm``) reports
    through :func:`progress`: a bar on a terminal, concise lines with an estimate in a log."""
    had = hasattr(module, "tqdm")
    old = getattr(module, "tqdm", None)
    module.tqdm = _Tracked
    try:
        yield
    finally:
        if had:
            module.tqdm = old
        else:
            del module.tqdm


def quiet_libraries() -> None:
    """Turn off the libraries' own progress bars and chatter (transformers' "Loading weights" bar,
    hub downloads, tokenizer fork warnings): their carriage-return redraws would fill a log, and
    lmforge reports those steps through :func:`progress`. Called by the CLI and the demo."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
