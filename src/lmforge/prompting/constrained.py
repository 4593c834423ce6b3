"""Constrained decoding: a choice among strings, a regular expression or a JSON schema, enforced by
masking the logits of our own decoding loop (``generation.decode(logits_mask=...)``).

The regex (a JSON schema is first turned into one by ``outlines_core.json_schema``) and the
tokenizer's vocabulary become a token-level automaton (``outlines_core.Index``: state -> {token ->
next state}); it is built once per (tokenizer, regex) and cached. Each decoding step, row ``b`` in
state ``s_b`` may emit token ``t`` only when ``t`` has a transition from ``s_b``; EOS is a
transition of the final states. On top of the library's automaton we keep, per state, the fewest
tokens ``d(s)`` that still reach a final state (reverse breadth-first search), and with ``r``
tokens of budget left a token is allowed only when ``d(next(s, t)) <= r - 1``: a generation cut
by ``max_new_tokens`` still ends in a complete, valid output.
"""
from __future__ import annotations

import collections
import json
import re
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import LmforgeError

# JSON Schema keywords the automaton enforces, or that only annotate (anything else is refused:
# a schema the decoder silently ignores would not give "always valid" outputs).
_ENFORCED = {"type", "properties", "required", "items", "prefixItems", "enum", "const", "anyOf", "oneOf",
             "allOf", "minLength", "maxLength", "pattern", "format", "minItems", "maxItems",
             "additionalProperties", "$ref", "$defs", "definitions"}
_ANNOTATIONS = {"title", "description", "examples", "default", "$schema", "$id", "$comment", "readOnly",
                "writeOnly", "deprecated"}
_CACHE_SIZE = 32


def _need_outlines():
    try:
        import outlines_core  # noqa: F401
    except ImportError:
        raise LmforgeError("constrained decoding needs outlines-core: pip install 'lmforge[structured]'") from None
    return outlines_core


# ---- the tokenizer's vocabulary as bytes ----------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_SENTINEL = "\U0010fffd"  # a private-use character appended to every pattern (see TokenAutomaton)
_HEX_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokenizer) -> dict[int, bytes]:
    """The bytes each non-special token adds to the text when decoded mid-sequence.

    Byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM2) spell bytes with stand-in characters;
    SentencePiece-style ones use ``▁`` for a space and ``<0xNN>`` byte-fallback tokens.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = backend.decoder.__getstate__() if backend is not None and backend.decoder is not None else b""
    byte_level = b"ByteLevel" in (decoder if isinstance(decoder, bytes) else str(decoder).encode())
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    table = _byte_decoder() if byte_level else None
    out: dict[int, bytes] = {}
    for piece, i in tokenizer.get_vocab().items():
        if i in special:
            continue
        if table is not None:
            if all(c in table for c in piece):
                out[i] = bytes(table[c] for c in piece)
            else:  # an added non-byte-level token (e.g. a chat marker)
                out[i] = piece.encode()
            continue
        m = _HEX_BYTE.match(piece)
        out[i] = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()
    return {i: b for i, b in out.items() if b}


_VOCABS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer, eos_id: int):
    """(fingerprint, outlines Vocabulary) of a tokenizer; computed once per tokenizer object."""
    key = (id(tokenizer), eos_id)
    try:
        hit = _VOCABS.get(tokenizer)
    except TypeError:
        hit = None
    if hit is not None and hit[0] == key:
        return hit[1:]
    oc = _need_outlines()
    pieces: dict[bytes, list[int]] = {}
    for i, b in token_bytes(tokenizer).items():
        if i != eos_id:
            pieces.setdefault(b, []).append(i)
    fingerprint = (len(tokenizer), eos_id, hash(frozenset((b, tuple(v)) for b, v in pieces.items())))
    sentinel_id = max([eos_id, *(i for ids in pieces.values() for i in ids)]) + 1
    pieces.setdefault(_SENTINEL.encode(), []).append(sentinel_id)
    vocab = oc.Vocabulary(eos_id, pieces)
    try:
        _VOCABS[tokenizer] = (key, fingerprint, vocab, sentinel_id)
    except TypeError:
        pass
    return fingerprint, vocab, sentinel_id


# ---- the token automaton --------------------------------------------------------------------------
class TokenAutomaton:
    """Token-level automaton of a regex over one tokenizer's vocabulary.

    Attributes:
        initial: start state. finals: accepting states. eos: the EOS id (a final state's exit).
        distance: state -> fewest tokens to reach a final state (0 for final states).
    """

    def __init__(self, regex: str, vocab, eos_id: int, sentinel_id: int):
        oc = _need_outlines()
        try:
            index = oc.Index(f"(?:{regex}){_SENTINEL}", vocab)
        except (ValueError, RuntimeError) as exc:
            msg = str(exc).splitlines()[0]
            if "no transition" in msg or "incompatible" in msg:
                raise LmforgeError("constraint: no output of this pattern can be spelled with the model's tokens") from None
            raise LmforgeError(f"constraint: the pattern cannot be compiled ({msg})") from None
        self.regex, self.eos = regex, eos_id
        self.initial = index.get_initial_state()
        # outlines-core 0.2.14 drops the exits of an accepting state that lead to non-accepting
        # ones (``1(\\.2)?`` over {1, ., 2} never offers '.' after '1'). The pattern is therefore
        # compiled with a sentinel character appended: the library's accepting state is only ever
        # after the sentinel, and our final states are those with a sentinel exit (which becomes
        # EOS). States that entered the sentinel's bytes cannot reach a final state: pruned below.
        self.transitions: dict[int, dict[int, int]] = index.get_transitions()
        self.finals: set[int] = set()
        accepting = set(index.get_final_states())
        for state, edges in self.transitions.items():  # edited in place: millions of entries
            if edges.pop(sentinel_id, None) in accepting:
                self.finals.add(state)
                edges[eos_id] = state
            else:
                edges.pop(eos_id, None)
        self.distance = self._distances()
        if self.initial not in self.distance:
            raise LmforgeError("constraint: the pattern accepts no complete output with the model's tokens")
        self._options: dict[int, tuple[Tensor, Tensor]] = {}

    def _distances(self) -> dict[int, int]:
        """Reverse breadth-first search from the final states over the state graph."""
        parents: dict[int, set[int]] = collections.defaultdict(set)
        for s, edges in self.transitions.items():
            for nxt in set(edges.values()):
                if nxt != s:
                    parents[nxt].add(s)
        dist = {f: 0 for f in self.finals}
        queue = collections.deque(self.finals)
        while queue:
            s = queue.popleft()
            for p in parents.get(s, ()):
                if p not in dist:
                    dist[p] = dist[s] + 1
                    queue.append(p)
        return dist

    def options(self, state: int) -> tuple[Tensor, Tensor]:
        """(token ids (n,) int64, fewest tokens to finish after each (n,) int64) from ``state``;
        tokens leading to dead states are left out."""
        hit = self._options.get(state)
        if hit is None:
            edges = self.transitions.get(state, {})
            far = 1 << 30
            ids = torch.tensor(list(edges.keys()), dtype=torch.long)
            after = torch.tensor([self.distance.get(n, far) for n in edges.values()], dtype=torch.long)
            live = after < far
            hit = self._options[state] = (ids[live], after[live])
        return hit

    def step(self, state: int, token: int) -> int:
        nxt = self.transitions.get(state, {}).get(token)
        if nxt is None:
            raise RuntimeError(f"token {token} is not allowed in state {state}")  # a masking bug, not user input
        return nxt

    def shortest(self) -> list[int]:
        """A shortest accepted token sequence (without EOS)."""
        s, out = self.initial, []
        while s not in self.finals:
            ids, after = self.options(s)
            k = int(after.argmin())
            out.append(int(ids[k]))
            s = self.step(s, out[-1])
        return out


_AUTOMATA: "collections.OrderedDict[tuple, TokenAutomaton]" = collections.OrderedDict()


def automaton(regex: str, tokenizer, eos_id: int) -> TokenAutomaton:
    """The cached automaton of ``regex`` over ``tokenizer`` (built once per tokenizer and regex)."""
    fingerprint, vocab, sentinel_id = _vocabulary(tokenizer, eos_id)
    key = (fingerprint, regex)
    if key in _AUTOMATA:
        _AUTOMATA.move_to_end(key)
        return _AUTOMATA[key]
    auto = _AUTOMATA[key] = TokenAutomaton(regex, vocab, eos_id, sentinel_id)
    while len(_AUTOMATA) > _CACHE_SIZE:
        _AUTOMATA.popitem(last=False)
    return auto


# ---- what the user asks for -----------------------------------------------------------------------
_META = set("\\.^$|?*+()[]{}-&~#")


def _escape(text: str) -> str:
    return "".join("\\" + c if c in _META else c for c in text)


def _check_schema_keywords(node, where: str = "") -> None:
    if isinstance(node, list):
        for i, x in enumerate(node):
            _check_schema_keywords(x, f"{where}/{i}")
        return
    if not isinstance(node, dict):
        return
    for k, v in node.items():
        if k in ("properties", "$defs", "definitions") and isinstance(v, dict):
            for name, sub in v.items():
                _check_schema_keywords(sub, f"{where}/{k}/{name}")
        elif k in _ENFORCED:
            _check_schema_keywords(v, f"{where}/{k}")
        elif k not in _ANNOTATIONS:
            raise LmforgeError(f"schema{where or '/'}: keyword '{k}' cannot be enforced by constrained decoding "
                               "(use enum, pattern, minLength/maxLength, minItems/maxItems)")
    for lo, hi in (("minItems", "maxItems"), ("minLength", "maxLength")):
        if isinstance(node.get(lo), int) and isinstance(node.get(hi), int) and node[lo] > node[hi]:
            raise LmforgeError(f"schema{where or '/'}: {lo} {node[lo]} > {hi} {node[hi]}, so no value can satisfy it")
    if node.get("enum") == []:
        raise LmforgeError(f"schema{where or '/'}: 'enum' is empty, so no value can satisfy it")
    if node.get("additionalProperties") is False and isinstance(node.get("required"), list):
        missing = [r for r in node["required"] if r not in (node.get("properties") or {})]
        if missing:
            raise LmforgeError(f"schema{where or '/'}: required '{missing[0]}' is not among the allowed properties, "
                               "so no object can satisfy it")


def schema_regex(schema) -> str:
    """The regex of a JSON schema (a dict or its JSON text), after checking that it is valid JSON
    Schema and uses only keywords the automaton enforces."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise LmforgeError(f"schema: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(schema, dict):
        raise LmforgeError("schema: must be a JSON object")
    try:
        import jsonschema
    except ImportError:
        raise LmforgeError("JSON-schema output needs jsonschema: pip install 'lmforge[structured]'") from None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = "/".join(str(p) for p in exc.path)
        raise LmforgeError(f"schema/{path}: not valid JSON Schema ({exc.message})") from None
    _check_schema_keywords(schema)
    _need_outlines()
    from outlines_core.json_schema import build_regex_from_schema

    try:
        return build_regex_from_schema(json.dumps(schema), r"[ ]?")
    except (ValueError, RuntimeError, TypeError) as exc:
        raise LmforgeError(f"schema: cannot be turned into a pattern ({str(exc).splitlines()[0]})") from None


@dataclass
class Constraint:
    """What a generation must match: ``Constraint.choice([...])``, ``.regex(p)`` or ``.json_schema(s)``.

    Attributes:
        kind: "choice", "regex" or "json".
        pattern: the regex the automaton is built from.
        schema: the JSON schema (kind "json"), used to validate outputs.
    """

    kind: str
    pattern: str
    schema: dict | None = None

    @classmethod
    def choice(cls, options) -> "Constraint":
        opts = [o for o in (options or [])]
        if not opts or any(not isinstance(o, str) or not o for o in opts):
            raise LmforgeError("choice: give a non-empty list of non-empty strings")
        return cls("choice", "(" + "|".join(_escape(o) for o in dict.fromkeys(opts)) + ")")

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        if not isinstance(pattern, str) or not pattern:
            raise LmforgeError("regex: give a non-empty pattern")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise LmforgeError(f"regex '{pattern}': does not compile ({exc})") from None
        body = pattern[1:] if pattern.startswith("^") else pattern  # the whole output must match anyway
        body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body
        return cls("regex", body)

    @classmethod
    def json_schema(cls, schema) -> "Constraint":
        pattern = schema_regex(schema)
        return cls("json", pattern, json.loads(schema) if isinstance(schema, str) else schema)

    def validate(self, text: str) -> str | None:
        """None when ``text`` satisfies the constraint, else a short reason."""
        if self.kind != "json":
            return None if re.fullmatch(self.pattern, text, flags=re.DOTALL) else "does not match the pattern"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"not JSON ({exc.msg})"
        import jsonschema

        err = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(self.schema)(self.schema)
                                               .iter_errors(value))
        return None if err is None else err.message

    def bind(self, model, tokenizer, max_new_tokens: int, eos_id: int | None = None) -> "BoundConstraint":
        """The per-batch ``logits_mask`` factory for :func:`lmforge.generation.generate`."""
        from ..generation import eos_token_ids

        if eos_id is None:
            eos = eos_token_ids(model, tokenizer)
            if not eos:
                raise LmforgeError("constrained decoding needs a tokenizer with an end-of-sequence token")
            eos_id = eos[0]
        auto = automaton(self.pattern, tokenizer, eos_id)
        need = auto.distance[auto.initial]
        if need > max_new_tokens:
            raise LmforgeError(f"max_new_tokens {max_new_tokens} is too small: the shortest valid output "
                               f"takes {need} tokens")
        if self.kind == "json":
            shortest = tokenizer.decode(auto.shortest())
            why = self.validate(shortest)
            if why is not None:
                raise LmforgeError(f"schema: cannot be satisfied as written (its shortest output {shortest!r} "
                                   f"fails: {why})")
        vocab_size = int(getattr(model.config, "vocab_size", 0) or 0) or len(tokenizer)
        return BoundConstraint(auto, max(vocab_size, len(tokenizer)), max_new_tokens)


class BoundConstraint:
    """A constraint tied to one tokenizer and budget; calling it with a row count gives the
    ``logits_mask(out, done) -> (B, V) bool`` of one batch (each row keeps its automaton state)."""

    def __init__(self, auto: TokenAutomaton, vocab_size: int, budget: int):
        self.auto, self.vocab_size, self.budget = auto, vocab_size, budget

    def __call__(self, rows: int):
        auto, budget, width = self.auto, self.budget, self.vocab_size
        states = [auto.initial] * rows
        consumed = [0] * rows

        def logits_mask(out: list[list[int]], done: Tensor) -> Tensor:
            allowed = torch.zeros(rows, width, dtype=torch.bool)  # (B, V)
            for r in range(rows):
                if bool(done[r]):
                    allowed[r] = True  # the loop feeds padding to finished rows
                    continue
                ids = out[r]
                while consumed[r] < len(ids):
                    states[r] = auto.step(states[r], ids[consumed[r]])
                    consumed[r] += 1
                tokens, after = auto.options(states[r])
                left = budget - len(ids)  # tokens this row may still emit, this one included
                allowed[r, tokens[after <= left - 1]] = True
            return allowed.to(done.device)

        return logits_mask


def generate_constrained(model, tokenizer, prompts, cfg, constraint: Constraint, *, chat: bool | None = None) -> list[str]:
    """:func:`lmforge.generation.generate` with every output held to ``constraint``."""
    from ..generation import generate

    bound = constraint.bind(model, tokenizer, cfg.max_new_tokens)
    return generate(model, tokenizer, prompts, cfg, chat=chat, constraint=bound)
