"""Prompt recipes: named components rendered through the model's chat template, few-shot examples
(fixed, or the most similar per input by lmforge's sentence encoder), an optional output
constraint (choice / regex / JSON schema) and decoding settings.

A recipe (YAML)::

    persona: You are a film critic.            # system message: persona, audience, tone
    audience: readers of a daily newspaper
    tone: concise and friendly
    instruction: Classify the sentiment of the review.   # user message, in this order:
    context: "Reviews come from {site}."                 # instruction, context, data, format
    data: "Review: {text}"
    format: Reply with one word.
    examples: {file: shots.jsonl, k: 4, select: similar, encoder: minilm, output: label}
    output: {choice: [positive, negative]}     # or {regex: ...} or {json_schema: {...}}
    generation: {max_new_tokens: 16, temperature: 0}

Components are Python format strings over the input record's fields (``{text}``); a field the
record lacks is one error line naming the component, the field and the record.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import LmforgeError

SYSTEM_PARTS = ("persona", "audience", "tone")
USER_PARTS = ("instruction", "context", "data", "format")
_LABELS = {"persona": "{}", "audience": "Your audience: {}", "tone": "Tone: {}"}


class Examples(BaseModel):
    """Few-shot examples: records with the input fields and the ``output`` field."""

    model_config = ConfigDict(extra="forbid")
    file: str
    k: int = Field(3, ge=0)
    select: str = Field("fixed", pattern="^(fixed|similar)$")
    encoder: str = "minilm"
    output: str = "output"


class Output(BaseModel):
    model_config = ConfigDict(extra="forbid")
    choice: list[str] | None = None
    regex: str | None = None
    json_schema: dict | str | None = None


class Generation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    batch_size: int = Field(8, gt=0)


class PromptRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    persona: str | None = None
    audience: str | None = None
    tone: str | None = None
    instruction: str | None = None
    context: str | None = None
    data: str | None = None
    format: str | None = None
    examples: Examples | None = None
    output: Output | None = None
    generation: Generation = Generation()
    source: str = Field("recipe", exclude=True)

    def fields(self) -> dict[str, list[str]]:
        """The variables each component uses, e.g. ``{"data": ["text"]}``."""
        out = {}
        for part in SYSTEM_PARTS + USER_PARTS:
            text = getattr(self, part)
            if text:
                try:
                    out[part] = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
                except ValueError as exc:
                    raise LmforgeError(f"{self.source}: {part}: bad template ({exc})") from None
                for f in out[part]:
                    if not f.isidentifier():
                        raise LmforgeError(f"{self.source}: {part}: '{{{f}}}' is not a field name "
                                           "(write {{ and }} for literal braces)")
        return out

    def constraint(self):
        """The output :class:`~lmforge.prompting.constrained.Constraint`, or None."""
        from .constrained import Constraint

        o = self.output
        if o is None:
            return None
        given = [k for k in ("choice", "regex", "json_schema") if getattr(o, k) is not None]
        if len(given) != 1:
            raise LmforgeError(f"{self.source}: output: give exactly one of choice, regex, json_schema")
        return {"choice": Constraint.choice, "regex": Constraint.regex,
                "json_schema": Constraint.json_schema}[given[0]](getattr(o, given[0]))


def load_recipe(path: str | Path) -> PromptRecipe:
    """Read and check a recipe YAML file (lmforge's YAML reader: non-UTF-8, duplicate keys and
    alias bombs are one line)."""
    from ..config import read_yaml

    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"{p}: recipe not found")
    return recipe_from_dict(read_yaml(p), str(p))


def recipe_from_dict(raw: Any, source: str = "recipe") -> PromptRecipe:
    if not isinstance(raw, dict):
        raise LmforgeError(f"{source}: a recipe is a mapping of components")
    try:
        recipe = PromptRecipe(**raw, source=source)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise LmforgeError(f"{source}: {'.'.join(str(x) for x in e['loc'])}: {e['msg']}") from None
    if not any(getattr(recipe, p) for p in USER_PARTS):
        raise LmforgeError(f"{source}: give at least one of {', '.join(USER_PARTS)}")
    recipe.fields()
    return recipe


def _fill(recipe: PromptRecipe, part: str, record: dict, where: str) -> str:
    text = getattr(recipe, part)
    for f in recipe.fields().get(part, []):
        if f not in record:
            raise LmforgeError(f"{recipe.source}: {part} uses {{{f}}}, which {where} does not have "
                               f"(fields: {', '.join(sorted(record)) or 'none'})")
    return text.format(**{k: ("" if v is None else v) for k, v in record.items()})


def user_text(recipe: PromptRecipe, record: dict, where: str = "the input") -> str:
    return "\n\n".join(_fill(recipe, p, record, where) for p in USER_PARTS if getattr(recipe, p))


def system_text(recipe: PromptRecipe, record: dict, where: str = "the input") -> str | None:
    parts = [_LABELS[p].format(_fill(recipe, p, record, where)) for p in SYSTEM_PARTS if getattr(recipe, p)]
    return "\n".join(parts) or None


def select_examples(recipe: PromptRecipe, records: list[dict], base: Path | None = None) -> list[list[dict]]:
    """Per input record, the few-shot examples: the first k, or the k nearest by cosine similarity
    of the encoder's embeddings of the rendered user texts."""
    ex = recipe.examples
    if ex is None or ex.k == 0:
        return [[] for _ in records]
    from ..data.readers import read_table

    path = Path(ex.file)
    if not path.is_absolute() and base is not None and not path.exists():
        path = base / path
    table = read_table(str(path))
    if not table.records:
        raise LmforgeError(f"{ex.file}: no examples (empty file)")
    for i, r in enumerate(table.records):
        if ex.output not in r:
            raise LmforgeError(f"{table.where(i)}: example has no '{ex.output}' field")
        user_text(recipe, r, table.where(i))
    shots = table.records
    if ex.select == "fixed" or len(shots) <= ex.k:
        return [shots[:ex.k] for _ in records]
    import numpy as np

    from ..search.index import embed_texts, load_encoder

    encoder, place = load_encoder(ex.encoder)
    a = embed_texts(encoder, place, [user_text(recipe, r) for r in records])  # (N, D) unit rows
    b = embed_texts(encoder, place, [user_text(recipe, r) for r in shots])  # (M, D)
    order = np.argsort(-(a @ b.T), axis=1, kind="stable")[:, :ex.k]  # (N, k) most similar first
    return [[shots[j] for j in reversed(row)] for row in order]  # the most similar last, next to the input


def render_messages(recipe: PromptRecipe, record: dict, shots: list[dict], where: str = "the input") -> list[dict]:
    """Chat messages: system (persona, audience, tone), example turns, then the input's turn."""
    msgs = []
    system = system_text(recipe, record, where)
    if system:
        msgs.append({"role": "system", "content": system})
    for s in shots:
        msgs += [{"role": "user", "content": user_text(recipe, s, "an example")},
                 {"role": "assistant", "content": str(s[recipe.examples.output])}]
    msgs.append({"role": "user", "content": user_text(recipe, record, where)})
    return msgs


def run_recipe(model, tokenizer, recipe: PromptRecipe, records: list[dict], *, where=None,
               base: Path | None = None) -> list[dict]:
    """Render and generate for each record; returns ``{"prompt": messages, "output": text}`` per
    record (plus ``"valid"`` when the recipe constrains the output)."""
    from ..generation import GenerationConfig, generate

    where = where or (lambda i: f"input {i + 1}")
    constraint = recipe.constraint()
    messages = [render_messages(recipe, r, [], where(i)) for i, r in enumerate(records)]  # checks fields
    shots = select_examples(recipe, records, base)
    messages = [render_messages(recipe, r, s, where(i)) for i, (r, s) in enumerate(zip(records, shots))]
    g = recipe.generation
    cfg = GenerationConfig(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                           seed=g.seed, batch_size=g.batch_size)
    bound = constraint.bind(model, tokenizer, cfg.max_new_tokens) if constraint is not None else None
    texts = generate(model, tokenizer, messages, cfg, constraint=bound)
    out = []
    for m, t in zip(messages, texts):
        row = {"prompt": m, "output": t}
        if constraint is not None:
            row["valid"] = constraint.validate(t) is None
        out.append(row)
    return out
