"""Evaluating generative models: perplexity of causal LMs on texts, ROUGE/BLEU of generations
(causal or seq2seq models) against references.

Perplexity (natural log): ``PPL = exp( (1/N) sum_t -log p(x_t | x_<t) )`` over every token that
has a context (the first token of each window is not scored). Texts longer than ``max_length``
tokens are cut into consecutive windows of ``max_length`` tokens, each scored on its own.
The loss is computed from the final hidden states with
:func:`lmforge.losses.lm.chunked_cross_entropy`, so no ``(B, T, V)`` logits are materialised.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ..errors import LmforgeError

__all__ = ["perplexity_of_texts", "generation_scores", "read_perplexity_texts", "read_generation_pairs",
           "evaluate_generation"]


def _windows(ids: list[int], max_length: int) -> list[list[int]]:
    """Consecutive windows of at most ``max_length`` tokens; windows of one token score nothing."""
    return [w for w in (ids[i:i + max_length] for i in range(0, len(ids), max_length)) if len(w) > 1]


def _output_head(model):
    """``(weight, bias)`` of the plain output projection, or None when logits need the model's own
    head (a LoRA-wrapped head, logit soft-capping, no Linear head)."""
    head = model.get_output_embeddings()
    cfg = getattr(model, "config", None)
    if not isinstance(head, torch.nn.Linear) or getattr(cfg, "final_logit_softcapping", None):
        return None
    return head.weight, head.bias


@torch.no_grad()
def perplexity_of_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8,
                        max_length: int | None = None, autocast=None) -> dict:
    """Token-level perplexity of a causal LM on ``texts``.

    Windows are sorted by length and batched (right padding, ignored in the loss); each batch's
    summed NLL is ``chunked_cross_entropy(h, W, shift(labels))`` on the final hidden states ``h``
    (B, T, H) and the head weight ``W`` (V, H).

    Args:
        model: a causal LM (``get_decoder()`` gives hidden states, ``get_output_embeddings()`` the head).
        tokenizer: its tokenizer; texts are encoded with its special tokens (e.g. BOS).
        texts: non-empty texts.
        batch_size: windows per forward pass.
        max_length: window length (default: the model's max positions, at most 1024).
        autocast: optional context manager factory (``Placement.autocast``).

    Returns:
        ``{"nll", "perplexity", "tokens", "texts", "windows"}`` (nll is the mean per token).
    """
    import torch.nn.functional as F

    from ..data.batching import attention_mask, length_grouped_batches, pad_sequences
    from ..losses.lm import chunked_cross_entropy, shift_labels
    from .metrics import perplexity_report

    if not texts:
        raise LmforgeError("no texts to score")
    if max_length is None:
        max_length = min(int(getattr(model.config, "max_position_embeddings", 1024) or 1024), 1024)
    windows = [w for t in texts for w in _windows(list(tokenizer(t)["input_ids"]), max_length)]
    if not windows:
        raise LmforgeError("no text has two or more tokens: nothing to score")
    device = next(model.parameters()).device
    head = _output_head(model)
    nll = torch.zeros((), dtype=torch.float64)
    tokens = 0
    batches = length_grouped_batches([len(w) for w in windows], batch_size, seed=0, epoch=0, shuffle=False)
    for idx in batches:
        ids = pad_sequences([windows[i] for i in idx], 0).to(device)  # (B, T)
        mask = attention_mask([windows[i] for i in idx]).to(device)  # (B, T)
        labels = shift_labels(ids.masked_fill(mask == 0, -100))  # (B, T): t predicts t + 1
        with autocast() if autocast is not None else contextlib.nullcontext():
            if head is not None:
                hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
                loss = chunked_cross_entropy(hidden, head[0], labels, bias=head[1], reduction="sum")
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        nll += loss.double().cpu()
        tokens += int((labels != -100).sum())
    report = perplexity_report(float(nll), tokens)
    return report | {"texts": len(texts), "windows": len(windows)}


def generation_scores(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> dict:
    """ROUGE-1/2/L/Lsum F (rouge-score) and corpus BLEU (sacrebleu) of predictions against references.

    Returns:
        ``{"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "n"}`` (ROUGE in [0, 1], BLEU in [0, 100]).
    """
    from .text import bleu, rouge

    scores = rouge(predictions, references)
    scores["bleu"] = bleu(predictions, references)["bleu"]
    return scores


def read_perplexity_texts(path: str, column: str = "text") -> list[str]:
    """Texts of a data file: a ``.txt`` file's lines, or a table's ``text`` column."""
    from ..data.readers import read_table
    from ..data.schema import require_columns, text_values

    table = read_table(path)
    require_columns(table, [column])
    return text_values(table, column)


PROMPT_FIELDS = ("prompt", "messages")
REFERENCE_FIELDS = ("reference", "references", "completion", "summary", "target")


def read_generation_pairs(path: str, *, prompt_template: str | None = None,
                          reference: str | None = None) -> tuple[list, list]:
    """Prompts and references of a data file.

    The prompt is ``prompt_template`` formatted with the record's columns (e.g.
    ``"Summarize:\n{dialogue}"``) when given, else its ``prompt`` text or chat ``messages``; the
    reference is the ``reference`` column when given, else the first of ``reference``/``references``/
    ``completion``/``summary``/``target`` (a text or a list of texts)."""
    from ..data.readers import read_table

    table = read_table(path)
    if not table.records:
        raise LmforgeError(f"{path}: no examples")
    prompts, refs = [], []
    ref_fields = (reference,) if reference else REFERENCE_FIELDS
    for i, rec in enumerate(table.records):
        where = table.where(i)
        r_key = next((k for k in ref_fields if k in rec), None)
        if prompt_template is not None:
            try:
                prompt, p_key = prompt_template.format_map(rec), "prompt"
            except KeyError as exc:
                raise LmforgeError(f"{where}: --prompt-template needs column {exc.args[0]!r}") from None
            except (ValueError, IndexError) as exc:
                raise LmforgeError(f"--prompt-template is malformed ({exc})") from None
        else:
            p_key = next((k for k in PROMPT_FIELDS if k in rec), None)
            prompt = rec.get(p_key) if p_key else None
        if p_key is None or r_key is None:
            missing = "a 'prompt' or 'messages'" if p_key is None else "a reference (" + "/".join(ref_fields) + ")"
            raise LmforgeError(f"{where}: missing {missing} field")
        ref = rec[r_key]
        if p_key == "prompt" and (not isinstance(prompt, str) or not prompt.strip()):
            raise LmforgeError(f"{where}: 'prompt' must be non-empty text")
        if p_key == "messages" and (not isinstance(prompt, list) or not prompt):
            raise LmforgeError(f"{where}: 'messages' must be a non-empty list of role/content objects")
        if isinstance(ref, list):
            if not ref or not all(isinstance(r, str) for r in ref):
                raise LmforgeError(f"{where}: '{r_key}' must be a text or a non-empty list of texts")
        elif not isinstance(ref, str):
            raise LmforgeError(f"{where}: '{r_key}' must be text, got {type(ref).__name__}")
        prompts.append(prompt)
        refs.append(ref)
    return prompts, refs


def evaluate_generation(model: str, data: str, gcfg, *, adapter: str | None = None, prompt_template: str | None = None,
                        reference: str | None = None, chat: bool | None = None, device: str = "auto",
                        precision: str = "auto") -> dict:
    """ROUGE/BLEU of a model's generations (causal LM or seq2seq: T5, BART ...) on a data file.

    Args:
        model: model reference, run directory or adapter folder (:func:`lmforge.causal_lm.resolve_source`).
        data: records with a prompt (or ``prompt_template`` columns) and a reference (see
            :func:`read_generation_pairs`).
        gcfg: decoding settings (:class:`lmforge.generation.GenerationConfig`).
        adapter: adapter folder or run on the base ``model``.
        chat: apply the chat template to text prompts (None: when the tokenizer has one; seq2seq
            models: never).

    Returns:
        ``{"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "n", "generation_seconds", "decoding",
        "examples"}``.
    """
    import dataclasses
    import time

    from ..causal_lm import is_seq2seq, load_causal_lm, resolve_source
    from ..device import Placement
    from ..generation import generate

    prompts, refs = read_generation_pairs(data, prompt_template=prompt_template, reference=reference)
    placement = Placement.resolve(device, precision)  # bad data fails before the model loads
    lm, tokenizer, _ = load_causal_lm(resolve_source(model, adapter), device=placement.device, seq2seq_ok=True)
    if is_seq2seq(lm):
        chat = False
    t0 = time.perf_counter()
    with placement.autocast():
        predictions = generate(lm, tokenizer, prompts, gcfg, chat=chat)
    seconds = time.perf_counter() - t0
    report = generation_scores(predictions, refs)
    examples = [{"prediction": p, "reference": r} for p, r in list(zip(predictions, refs))[:3]]
    return report | {"generation_seconds": round(seconds, 3), "decoding": dataclasses.asdict(gcfg),
                     "prompt_template": prompt_template, "examples": examples}
