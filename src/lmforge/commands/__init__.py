"""CLI command modules: each defines ``register(subparsers)`` adding its sub-command(s).

Add a module name to ``COMMAND_MODULES`` to expose it in ``lmforge``. Modules must import
heavy libraries inside their command functions, not at import time.
"""
COMMAND_MODULES: list[str] = [
    "lmforge.commands.core",
    "lmforge.commands.align",
    "lmforge.commands.generate",
    "lmforge.commands.embed",
    "lmforge.commands.fill_mask",
    "lmforge.commands.compare",
    "lmforge.commands.report",
    "lmforge.commands.serve",
    "lmforge.commands.search",
    "lmforge.commands.inspect",
    "lmforge.commands.topics",
    "lmforge.commands.prompt",
    "lmforge.commands.factuality",
]
