"""Constrained decoding: always-valid outputs on random schemas, allowed-set parity with an
independent oracle (the ``regex`` module's partial matching), cache, budget, bad input."""
from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("outlines_core")
jsonschema = pytest.importorskip("jsonschema")

from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.generation import GenerationConfig  # noqa: E402
from lmforge.prompting.constrained import (Constraint, automaton, generate_constrained,  # noqa: E402
                                           token_bytes)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "enum", "array", "object"] if depth < 2 else \
        ["string", "integer", "number", "boolean", "enum"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 6)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(1, 3)}
    if kind == "object":
        names = rng.sample(["a", "bb", "name", "x1", "tags", "ok"], rng.randint(1, 3))
        props = {n: random_schema(rng, depth + 1) for n in names}
        return {"type": "object", "properties": props, "required": rng.sample(names, rng.randint(0, len(names)))}
    return {"type": kind}


def test_random_schemas_always_parse_and_validate(tiny_lm, tiny_tok):
    """40 random nested schemas x 3 sampled rows (KV cache, batched) + greedy without cache:
    every output parses and validates, even when the budget cuts generation short."""
    rng = random.Random(0)
    bad, total = [], 0
    for i in range(40):
        schema = {"type": "object", "properties": {"v": random_schema(rng)}, "required": ["v"]} if i % 2 else \
            random_schema(rng)
        c = Constraint.json_schema(schema)
        cfg = GenerationConfig(max_new_tokens=48, temperature=1.0, seed=i, batch_size=3,
                               use_cache=bool(i % 4 != 3))
        outs = generate_constrained(tiny_lm, tiny_tok, ["go", "json please", "x"], cfg, c, chat=False)
        for out in outs:
            total += 1
            try:
                jsonschema.validate(json.loads(out), schema)
            except Exception as exc:  # noqa: BLE001 - collected for the message
                bad.append((schema, out, str(exc)[:80]))
    assert total == 120
    assert not bad, bad[:3]


def test_regex_and_choice_outputs_match(tiny_lm, tiny_tok):
    import re

    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=3, batch_size=4)
    outs = generate_constrained(tiny_lm, tiny_tok, ["a", "b", "c", "d"], cfg,
                                Constraint.regex(r"^\(\d{3}\) \d{3}-\d{4}$"), chat=False)
    assert all(re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", o) for o in outs), outs
    outs = generate_constrained(tiny_lm, tiny_tok, ["a", "b", "c", "d"], cfg,
                                Constraint.choice(["yes", "no", "maybe not"]), chat=False)
    assert set(outs) <= {"yes", "no", "maybe not"}, outs


def _oracle_allowed(pattern: str, prefix: bytes, pieces: dict[int, bytes], eos: int) -> set[int]:
    """Tokens t with prefix+t a prefix of some match (regex partial matching); EOS on a full match."""
    import regex

    rx = regex.compile(pattern)
    ok = set()
    for i, b in pieces.items():
        try:
            s = (prefix + b).decode("utf-8")
        except UnicodeDecodeError:
            continue  # split multi-byte characters: not in these ASCII patterns
        if rx.fullmatch(s, partial=True):
            ok.add(i)
    if rx.fullmatch(prefix.decode("utf-8")):
        ok.add(eos)
    return ok


@pytest.mark.parametrize("pattern", [r"(yes|no|maybe)", r"[0-9]{1,3}(\.[0-9])?", r"a+b?c{2}",
                                     r'\{"k": (true|false)\}', r"(cat|category|dog)s?"])
def test_allowed_sets_match_partial_match_oracle(tiny_tok, pattern):
    """Along random accepted paths, the automaton's allowed set (before the budget filter)
    equals the set an independent regex engine admits."""
    eos = tiny_tok.eos_token_id
    pieces = token_bytes(tiny_tok)
    auto = automaton(pattern, tiny_tok, eos)
    rng = random.Random(1)
    for _ in range(5):
        state, prefix = auto.initial, b""
        for _ in range(12):
            ids, _after = auto.options(state)
            mine = set(ids.tolist())
            assert mine == _oracle_allowed(pattern, prefix, pieces, eos), (pattern, prefix)
            choices = [t for t in mine if t != eos]
            if not choices:
                break
            t = rng.choice(choices)
            state, prefix = auto.step(state, t), prefix + pieces[t]


def test_budget_forces_completion_and_mask_is_per_row(tiny_tok):
    """With 3 tokens left in state after '[0-9]', only tokens that can still finish are allowed;
    finished rows allow everything (the loop feeds them padding)."""
    eos = tiny_tok.eos_token_id
    c = Constraint.regex(r"x[0-9]{0,10}y")
    auto = automaton(c.pattern, tiny_tok, eos)
    from lmforge.prompting.constrained import BoundConstraint

    x = [i for i, b in token_bytes(tiny_tok).items() if b == b"x"][0]
    bound = BoundConstraint(auto, len(tiny_tok), budget=2)
    mask = bound(2)([[x], []], torch.tensor([False, True]))
    allowed = {i for i in mask[0].nonzero().flatten().tolist()}
    pieces = token_bytes(tiny_tok)
    # one token left: it must complete the match in one go, e.g. 'y' (or digits+'y' merged)
    assert allowed and all(pieces[i].endswith(b"y") for i in allowed)
    assert bool(mask[1].all())


def test_automaton_is_built_once_per_tokenizer_and_pattern(tiny_tok):
    a = automaton(r"(ab|cd)+", tiny_tok, tiny_tok.eos_token_id)
    assert automaton(r"(ab|cd)+", tiny_tok, tiny_tok.eos_token_id) is a
    assert automaton(r"(ab|ce)+", tiny_tok, tiny_tok.eos_token_id) is not a


@pytest.mark.parametrize("make, message", [
    (lambda: Constraint.json_schema('{"type": '), "not valid JSON"),
    (lambda: Constraint.json_schema({"type": "bogus"}), "not valid JSON Schema"),
    (lambda: Constraint.json_schema({"enum": []}), "enum"),
    (lambda: Constraint.json_schema({"type": "integer", "minimum": 3}), "minimum"),
    (lambda: Constraint.json_schema({"type": "object", "properties": {"a": {"type": "string"}},
                                     "required": ["b"], "additionalProperties": False}), "required 'b'"),
    (lambda: Constraint.regex("[a-z+("), "does not compile"),
    (lambda: Constraint.choice([]), "non-empty"),
])
def test_bad_constraints_are_one_line_errors(make, message):
    with pytest.raises(LmforgeError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_unsatisfiable_schema_and_small_budget(tiny_lm, tiny_tok):
    with pytest.raises(LmforgeError, match="minItems 3 > maxItems 1"):
        Constraint.json_schema({"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 1})
    c = Constraint.json_schema({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]})
    with pytest.raises(LmforgeError, match="cannot be satisfied as written"):
        c.bind(tiny_lm, tiny_tok, 20)
    c = Constraint.regex(r"abcdefghij")
    with pytest.raises(LmforgeError, match="too small"):
        c.bind(tiny_lm, tiny_tok, 1)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"enum": ["x", "yy"]}}, "required": ["a", "b"]},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
    {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}}, "required": ["s"]},
])
def test_allowed_sets_match_the_library_on_json(tiny_tok, schema):
    """Where outlines-core's own Index is right (patterns ending in a closing bracket, so no
    accepting state has exits), our automaton offers exactly the library's allowed tokens."""
    from outlines_core import Index, Vocabulary

    from lmforge.prompting.constrained import schema_regex

    eos = tiny_tok.eos_token_id
    pieces: dict[bytes, list[int]] = {}
    for i, b in token_bytes(tiny_tok).items():
        if i != eos:
            pieces.setdefault(b, []).append(i)
    pattern = schema_regex(schema)
    lib = Index(pattern, Vocabulary(eos, pieces))
    auto = automaton(pattern, tiny_tok, eos)
    rng = random.Random(2)
    for _ in range(5):
        mine, theirs = auto.initial, lib.get_initial_state()
        for _ in range(15):
            ours = set(auto.options(mine)[0].tolist())
            assert ours == set(lib.get_allowed_tokens(theirs))
            choices = sorted(ours - {eos})
            if not choices:
                break
            t = rng.choice(choices)
            mine, theirs = auto.step(mine, t), lib.get_next_state(theirs, t)


def test_library_bug_is_worked_around(tiny_tok):
    """outlines-core drops '.' after '1' in ``1(\\.5)?``; our automaton keeps it."""
    pieces = token_bytes(tiny_tok)
    one = next(i for i, b in pieces.items() if b == b"1")
    dot = next(i for i, b in pieces.items() if b == b".")
    auto = automaton(r"1(\.5)?", tiny_tok, tiny_tok.eos_token_id)
    after = set(auto.options(auto.step(auto.initial, one))[0].tolist())
    assert {dot, tiny_tok.eos_token_id} <= after


@pytest.mark.integration
def test_smollm2_json_outputs_validate():
    from lmforge.merge import Source, load_causal_lm

    model, tok, _ = load_causal_lm(Source(base="smollm2"))
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
              "required": ["name", "age"]}
    cfg = GenerationConfig(max_new_tokens=40, temperature=0.9, seed=0, batch_size=3)
    outs = generate_constrained(model, tok, ["A person as JSON.", "Alice, 31, as JSON.", "Bob as JSON."], cfg,
                                Constraint.json_schema(schema))
    for o in outs:
        jsonschema.validate(json.loads(o), schema)
