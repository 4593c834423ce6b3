"""Reading what a user hands over, safely: YAML with duplicate keys refused and alias expansion
bounded, UTF-8 text with the failing line named, and values previewed (cut) in error messages
(re-exported by :mod:`lmforge.config`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import LmforgeError

PREVIEW = 60            # characters of a user value repeated in an error message
MAX_YAML_NODES = 100_000  # nodes of a YAML document once its aliases are expanded (a recipe has a few hundred)


def preview(value: Any, limit: int = PREVIEW) -> str:
    """``repr(value)`` cut to ``limit`` characters (``...`` and the full length when cut): an
    error message never repeats an unbounded input."""
    text = value if isinstance(value, str) else _short_repr(value, limit)
    text = repr(text) if isinstance(value, str) else text
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _short_repr(value: Any, limit: int) -> str:
    """repr of a container without building the whole string for huge (e.g. alias-expanded) values."""
    if isinstance(value, (list, tuple, set, dict)):
        n = len(value)
        return f"a {type(value).__name__} of {n} item{'s' * (n != 1)}"
    return repr(value)


# ---- YAML: duplicate keys are errors, alias expansion is bounded -------------------------------------------
class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys and documents whose aliases expand past
    ``MAX_YAML_NODES`` nodes (a 668-byte "billion laughs" document expands to 10^9)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                k = (key_node.tag, key_node.value)
                if k in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {preview(key_node.value)} (first at line {seen[k] + 1})",
                        key_node.start_mark)
                seen[k] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, MAX_YAML_NODES)
        if size > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?)", node.start_mark)
        return self.construct_document(node)


def _expanded_size(node, memo: dict, limit: int) -> int:
    """Nodes of ``node`` once every alias is expanded (shared sub-trees count each time), stopping past ``limit``."""
    got = memo.get(id(node))
    if got is not None:
        return got
    memo[id(node)] = limit + 1  # a recursive alias counts as unbounded
    if isinstance(node, yaml.ScalarNode):
        total = 1
    else:
        total = 1
        children = node.value if isinstance(node, yaml.SequenceNode) else [c for kv in node.value for c in kv]
        for child in children:
            total += _expanded_size(child, memo, limit)
            if total > limit:
                break
    memo[id(node)] = total
    return total


def load_yaml_text(text: str, source: str):
    """Parse YAML text with :class:`_RecipeLoader`; one-line errors naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise LmforgeError(f"{source}:{where} malformed YAML: {problem[:200]}") from None
    except RecursionError:
        raise LmforgeError(f"{source}: malformed YAML: nested too deeply") from None


def read_text_utf8(path: str | Path, what: str = "file") -> str:
    """A text file's contents; non-UTF-8 bytes are one line naming the file, line and byte (a BOM is dropped)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise LmforgeError(f"{p}: is a folder, expected a {what}") from None
    except OSError as exc:
        raise LmforgeError(f"{p}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise LmforgeError(f"{p} line {line}: not UTF-8 text (byte {exc.start + 1}: {exc.reason}); "
                           "save the file as UTF-8") from None


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with a one-line error for missing/malformed/non-UTF-8 files."""
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"{p}: recipe file not found")
    data = load_yaml_text(read_text_utf8(p, "recipe"), str(p)) or {}
    if not isinstance(data, dict):
        raise LmforgeError(f"{p}: a recipe must be a YAML mapping")
    return data
