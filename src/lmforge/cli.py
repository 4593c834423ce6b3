"""The ``lmforge`` command: one sub-command per job (see ``lmforge --help``).

Sub-commands live in :mod:`lmforge.commands`; this module only parses and reports errors:
an :class:`~lmforge.errors.LmforgeError` becomes one line on stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import LmforgeError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lmforge").setLevel(logging.INFO)
    from .progress import quiet_libraries

    quiet_libraries()


def build_parser() -> argparse.ArgumentParser:
    from .commands import COMMAND_MODULES

    p = argparse.ArgumentParser(prog="lmforge", description="Adapt, align and apply language models.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for cmd, sp in sub.choices.items():
        if cmd not in OWN_RECIPES and not any("--trust-remote-code" in a.option_strings for a in sp._actions):
            sp.add_argument("--trust-remote-code", action="store_true",
                            help="allow Python code shipped with a model to run (off: a run folder's "
                                 "config.yaml never turns it on)")
    return p


#: commands whose configs are the user's own recipes; every other command loads models, run folders
#: and indexes someone may have handed over: their configs never turn on remote code by themselves
OWN_RECIPES = ("train", "config", "compare")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command in OWN_RECIPES:
            return args.func(args)
        from .config import loading_saved_runs

        with loading_saved_runs(getattr(args, "trust_remote_code", False)):
            return args.func(args)
    except LmforgeError as err:
        print(f"lmforge: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
