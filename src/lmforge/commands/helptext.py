"""The input part of every command's ``--help``: what it reads, and one example line.

``input_help(parser, "JSONL with text and label", '{"text": "a gorgeous film", "label": 1}')`` puts

    input: JSONL with text and label
    example: {"text": "a gorgeous film", "label": 1}

under the parser's options (kept as written: the example stays one line). ``tests/test_help.py``
walks every sub-command and checks that each has both lines, and that JSON examples parse.
"""
from __future__ import annotations

import argparse
import textwrap


def input_help(parser: argparse.ArgumentParser, expects: str, example: str, *, more: str = "") -> None:
    """Add ``input: <expects>`` (wrapped) and ``example: <example>`` (one line) to ``parser``'s
    help; ``more``: further short lines (already wrapped) after them."""
    lines = textwrap.wrap(f"input: {expects}", width=78, subsequent_indent="  ", break_on_hyphens=False)
    lines.append(f"example: {example}")
    if more:
        lines.append(more)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "\n".join(lines)
