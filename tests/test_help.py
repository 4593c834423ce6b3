"""Every sub-command's ``--help`` says what input it expects, with one example line, and the example
is true: a command line parses with the real parser as that command, and a data line is accepted by
the reader the command uses."""
from __future__ import annotations

import argparse
import json
import shlex

import pytest

from lmforge.cli import build_parser


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sp in subs[0].choices.items():
        yield from _leaves(sp, path + (name,))


LEAVES = dict(_leaves(build_parser()))


def _example(help_text: str) -> str:
    lines = [ln for ln in help_text.splitlines() if ln.startswith("example: ")]
    assert len(lines) == 1, "one example line"
    return lines[0][len("example: "):]


def test_every_command_is_walked():
    names = {" ".join(p) for p in LEAVES}
    assert len(names) >= 30 and {"train", "eval", "predict", "topics show", "factuality run", "word2vec similar"} <= names


@pytest.mark.parametrize("path", sorted(LEAVES), ids=" ".join)
def test_help_lists_the_input_with_one_example_line(path):
    text = LEAVES[path].format_help()
    epilog = LEAVES[path].epilog or ""
    assert "\ninput: " in text, f"lmforge {' '.join(path)} --help: no 'input:' line"
    assert len(epilog.splitlines()) <= 10, "keep help texts short"
    example = _example(text)
    if example.startswith("{"):
        assert isinstance(json.loads(example), dict)
    else:  # a command line: it parses as this very command
        argv = shlex.split(example)
        assert argv[0] == "lmforge" and tuple(argv[1:1 + len(path)]) == path, example
        args = build_parser().parse_args(argv[1:])
        assert args.func is LEAVES[path].get_default("func")


def _one_line_file(tmp_path, path, line: str | None = None):
    f = tmp_path / "example.jsonl"
    f.write_text((line or _example(LEAVES[path].format_help())) + "\n", encoding="utf-8")
    return str(f)


def test_data_examples_are_read_by_the_commands_readers(tmp_path):
    from lmforge.api import read_prompts
    from lmforge.embeddings.evaluators import sts_from_file
    from lmforge.embeddings.files import read_texts
    from lmforge.eval.mc import read_mc_file
    from lmforge.factuality.data import read_prompts as read_fact_prompts
    from lmforge.search.evaluate import read_queries
    from lmforge.search.index import read_documents

    assert read_documents(_one_line_file(tmp_path, ("index",))) == [("d1", "The Eiffel Tower is in Paris.")]
    assert read_queries(_one_line_file(tmp_path, ("search",))) == {"q1": "where is the Eiffel Tower?"}
    assert read_prompts(_one_line_file(tmp_path, ("generate",)))[1] == ["Write a haiku about rain."]
    assert len(read_fact_prompts(_one_line_file(tmp_path, ("factuality", "sample")))) == 1
    for cmd in (("embed",), ("cluster",), ("word2vec", "train")):
        assert len(read_texts(_one_line_file(tmp_path, cmd), "text")) == 1
    more = {ln.split(":", 1)[0]: ln.split(":", 1)[1].strip() for ln in LEAVES[("eval",)].epilog.splitlines()
            if ln.startswith(("sts:", "mc:"))}
    mc = read_mc_file(_one_line_file(tmp_path, ("eval",), more["mc"]))
    assert [o.strip() for o in mc[0].options] == ["3", "4"] and mc[0].answer == 1
    sts = _one_line_file(tmp_path, ("eval",), more["sts"] + "\n" + more["sts"].replace("4.6", "1.0"))
    assert sts_from_file(sts).scores == [pytest.approx(0.92), pytest.approx(0.2)]
