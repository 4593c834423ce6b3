"""Evaluating causal LMs: perplexity on texts, ROUGE/BLEU of generations against references.

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

__all__ = ["perplexity_of_texts", "generation_scores", "read_perplexity_texts", "read_generation_pairs"]


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

    from ..data.batching import length_grouped_batches, pad_sequences
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
        mask = pad_sequences([[1] * len(windows[i]) for i in idx], 0).to(device)  # (B, T)
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


def read_generation_pairs(path: str) -> tuple[list, list]:
    """Prompts (``prompt`` text or chat ``messages``) and references (``reference``/``references``/
    ``completion``/``summary``/``target``: a text or a list of texts) of a data file."""
    from ..data.readers import read_table

    table = read_table(path)
    if not table.records:
        raise LmforgeError(f"{path}: no examples")
    prompts, refs = [], []
    for i, rec in enumerate(table.records):
        p_key = next((k for k in PROMPT_FIELDS if k in rec), None)
        r_key = next((k for k in REFERENCE_FIELDS if k in rec), None)
        if p_key is None or r_key is None:
            missing = "a 'prompt' or 'messages'" if p_key is None else "a reference (" + "/".join(REFERENCE_FIELDS) + ")"
            raise LmforgeError(f"{table.where(i)}: missing {missing} field")
        prompt, ref = rec[p_key], rec[r_key]
        if p_key == "prompt" and (not isinstance(prompt, str) or not prompt.strip()):
            raise LmforgeError(f"{table.where(i)}: 'prompt' must be non-empty text")
        if p_key == "messages" and (not isinstance(prompt, list) or not prompt):
            raise LmforgeError(f"{table.where(i)}: 'messages' must be a non-empty list of role/content objects")
        if isinstance(ref, list):
            if not ref or not all(isinstance(r, str) for r in ref):
                raise LmforgeError(f"{table.where(i)}: '{r_key}' must be a text or a non-empty list of texts")
        elif not isinstance(ref, str):
            raise LmforgeError(f"{table.where(i)}: '{r_key}' must be text, got {type(ref).__name__}")
        prompts.append(prompt)
        refs.append(ref)
    return prompts, refs
