"""Generation phases of causal-LM tasks, for people: greedy generations in batches with progress
(:mod:`lmforge.progress`), and the few sample generations the run report shows before and after
training (``api.train_config`` calls a task's ``sample_outputs()`` at both ends of training), and
the ROUGE/BLEU report of a run's generations (``eval --task generation``, sft's eval).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

from ..data.readers import read_table
from ..data.schema import apply_where, field_column
from ..errors import LmforgeError


def greedy_generations(task, prompts: Sequence[Any], *, max_new_tokens: int, batch_size: int, desc: str,
                       show: bool = True) -> list[str]:
    """Greedy completions of ``prompts`` (texts or chat messages, as the task's formatter gives
    them) by ``task.core``, in batches of ``batch_size`` taken longest first exactly as
    :func:`lmforge.generation.generate` batches them (so the texts are the same as one call), with
    a progress bar on a terminal or a line per 30 s in a log (``show`` and ``train.progress``)."""
    from ..generation import GenerationConfig, encode_prompts, generate
    from ..progress import progress

    if not prompts:
        return []
    gcfg = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    chat = task.fmt.chat
    lengths = [len(ids) for ids in encode_prompts(task.tokenizer, prompts, chat)]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # generate()'s own (stable) order
    out = [""] * len(prompts)
    enabled = show and bool(getattr(task.cfg.train, "progress", True))
    model = task.core
    was_training = model.training
    model.eval()
    try:
        with progress(len(prompts), enabled=enabled, desc=desc, unit="prompts") as bar, task.placement.autocast():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                texts = generate(model, task.tokenizer, [prompts[i] for i in rows], gcfg, chat=chat)
                for i, text in zip(rows, texts):
                    out[i] = text
                bar.update(len(rows))
    finally:
        model.train(was_training)
    return out


def prompt_text(prompt: Any) -> str:
    """A prompt as a person reads it: the text (a single user turn's content), or ``role: content``
    lines of chat messages."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], dict) \
            and prompt[0].get("role") == "user":
        return str(prompt[0].get("content", ""))
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def before_after(before: Sequence[dict] | None, after: Sequence[dict] | None) -> list[dict]:
    """Rows ``{"input", "before", "after", "reference"}`` of the report from two
    ``sample_outputs()`` lists (``{"input", "output", "reference"}`` each, same inputs in order)."""
    if not after:
        return []
    by_input = {b["input"]: b["output"] for b in before or []}
    rows = []
    for a in after:
        row = {"input": a["input"]}
        if a["input"] in by_input:
            row["before"] = by_input[a["input"]]
        row["after"] = a["output"]
        if a.get("reference") is not None:
            row["reference"] = a["reference"]
        rows.append(row)
    return rows


def generation_report(task, items: Sequence[dict], gcfg) -> dict:
    """ROUGE-1/2/L/Lsum and BLEU of ``task``'s generations (any causal-LM task or a seq2seq sft) for
    every item with a ``prompt`` (as its formatter gives it) and a ``reference``, with the decoding
    settings used and three examples."""
    import dataclasses

    from ..eval.generation import generation_scores
    from ..generation import generate

    gen = [it for it in items if "prompt" in it and it.get("reference") is not None]
    if not gen:
        raise LmforgeError("no evaluation rows with a prompt and a reference to generate for")
    task.model.eval()
    t0 = time.perf_counter()
    with task.placement.autocast():
        preds = generate(task.core, task.tokenizer, [it["prompt"] for it in gen], gcfg,
                         chat=False if getattr(task, "seq2seq", False) else task.fmt.chat)
    seconds = time.perf_counter() - t0
    report = generation_scores(preds, [it["reference"] for it in gen])
    task.last_generations = [{"prediction": p, "reference": it["reference"]} for p, it in zip(preds, gen)]
    return report | {"generation_seconds": round(seconds, 3), "decoding": dataclasses.asdict(gcfg),
                     "prompt_template": task.opts.prompt_template, "examples": task.last_generations[:3]}


def generation_items(task, path: str) -> list[dict]:
    """``{"prompt", "reference"}`` per record of ``path`` as a causal-LM run (e.g. DPO) prompts: its
    ``data.where`` filter, its prompt column mapping or ``prompt_template``, its chat formatting
    (:meth:`Formatter.generation_prompt`); the reference is the run's ``reference`` column, else the
    first of reference/references/completion/summary/target/chosen."""
    from ..eval.generation import REFERENCE_FIELDS

    table = apply_where(read_table(path), task.cfg.data.where)
    if not table.records:
        raise LmforgeError(f"{path}: no examples")
    dc = task.cfg.data
    ref_cols = [dc.columns["reference"]] if "reference" in dc.columns else [*REFERENCE_FIELDS, "chosen"]
    items = []
    for i, rec in enumerate(table.records):
        where = table.where(i)
        ref = next((rec[c] for c in ref_cols if c in rec), None)
        if ref is None:
            raise LmforgeError(f"{where}: missing a reference ({'/'.join(ref_cols)})")
        try:
            prompt = task.fmt.generation_prompt(task.prompt_value(rec, field_column(dc, "prompt"), where))
        except LmforgeError as err:
            msg = str(err)
            raise LmforgeError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        items.append({"prompt": prompt, "reference": ref})
    return items
