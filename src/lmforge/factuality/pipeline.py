"""The three file stages of ``lmforge factuality sample|score|pairs``.

Every input is checked before a model loads and every output is written atomically
(:mod:`lmforge.rundir`), so a bad input leaves nothing behind.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import LmforgeError
from .claims import split_claims

log = logging.getLogger(__name__)
METHODS = ("reference", "free")
GROUPINGS = ("rules", "nli")


def load_generator(model: str, adapter: str | None = None, device: str = "auto"):
    """``(model, tokenizer)`` of a causal LM reference or a causal run directory (sft/preference)."""
    from ..causal_lm import load_causal_lm, resolve_source
    from ..device import Placement
    from ..rundir import is_run_dir, read_config

    if is_run_dir(model):
        task = read_config(model).task
        if task not in ("sft", "preference"):
            raise LmforgeError(f"{model}: a '{task}' run does not generate text (use an sft or preference run)")
    place = Placement.resolve(device, "fp32")
    m, tok, _ = load_causal_lm(resolve_source(model, adapter), device=place.device)
    return m, tok


def sample_file(model: str, prompts: str | Path, out: str | Path, *, n: int = 4, temperature: float = 1.0,
                top_p: float = 0.95, max_new_tokens: int = 48, seed: int = 0, batch_size: int = 8,
                adapter: str | None = None, device: str = "auto", generator=None) -> dict:
    """Sample ``n`` answers per prompt of ``prompts`` into ``out`` (JSONL: the prompt record plus
    ``sample``, ``answer``, ``logprob``, ``answer_tokens``). ``generator``: an already loaded
    ``(model, tokenizer)`` pair (then ``model`` only names it)."""
    from ..generation import GenerationConfig
    from ..rundir import write_jsonl
    from .data import read_prompts
    from .sampler import sample_answers

    rows = read_prompts(prompts)
    if n < 1:
        raise LmforgeError(f"n: must be >= 1, got {n}")
    if temperature <= 0:
        raise LmforgeError(f"temperature: sampling needs > 0, got {temperature}")
    GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size)
    m, tok = generator or load_generator(model, adapter, device)
    samples, dropped = sample_answers(m, tok, rows, n, temperature=temperature, top_p=top_p,
                                      max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    write_jsonl(out, samples)
    return {"prompts": len(rows), "samples": len(samples), "dropped_empty": dropped, "out": str(out)}


def read_samples(path: str | Path) -> list[dict]:
    """Sampled answers (``prompt``, ``answer``; ``id``, ``references`` optional), checked."""
    from ..data.readers import read_table

    table = read_table(str(path))
    if not table.records:
        raise LmforgeError(f"{path}: no sampled answers (empty file)")
    for i, r in enumerate(table.records):
        for col in ("prompt", "answer"):
            if not isinstance(r.get(col), str):
                raise LmforgeError(f"{table.where(i)}: missing text '{col}'")
        if not r["answer"].strip() or not split_claims(r["answer"]):
            raise LmforgeError(f"{table.where(i)}: empty answer")
        r.setdefault("id", r["prompt"])
    return table.records


def check_scorable(rows: list[dict], method: str, source: str = "samples") -> None:
    """Bad input before any model loads: references for ``reference``, >= 2 answers per prompt for ``free``."""
    from .pairs import group_by_prompt

    if method not in METHODS:
        raise LmforgeError(f"method: choose from {', '.join(METHODS)}, got '{method}'")
    if method == "reference":
        for i, r in enumerate(rows):
            refs = r.get("references")
            refs = [refs] if isinstance(refs, str) else refs
            if not isinstance(refs, list) or not [x for x in refs if isinstance(x, str) and x.strip()]:
                raise LmforgeError(f"{source}: row {i + 1}: no 'references' (reference-based scoring needs them)")
    else:
        for pid, group in group_by_prompt(rows).items():
            if len(group) < 2:
                raise LmforgeError(f"{source}: prompt '{pid}' has {len(group)} answer; reference-free scoring "
                                   f"needs N >= 2 samples per prompt")


def score_rows(rows: list[dict], method: str, checker=None, *, group: str = "rules", rule: str = "jaccard",
               jaccard_min: float = 0.5, questions: list[str] | None = None) -> list[dict]:
    """Rows plus ``score`` (and ``claims``/``supported``/``unsupported``, or ``class``/``entropy``).
    ``questions`` (one per row, reference method): claims the question alone entails do not count
    as supported (``echoed`` is added)."""
    from .pairs import group_by_prompt
    from .scoring import class_shares, group_answers, group_with_checker, rule_equivalent, support_scores

    check_scorable(rows, method)
    if method == "reference":
        refs = [[r["references"]] if isinstance(r["references"], str) else r["references"] for r in rows]
        sup = support_scores([r["answer"] for r in rows], refs, checker, questions=questions,
                             discount_question=questions is not None)
        echo = (lambda s: {"echoed": s.echoed}) if questions is not None else (lambda s: {})
        return [r | {"score": round(s.score, 4), "claims": len(s.claims), "supported": s.supported,
                     "unsupported": s.unsupported, "claim_probs": s.probs} | echo(s) for r, s in zip(rows, sup)]
    if group not in GROUPINGS:
        raise LmforgeError(f"group: choose from {', '.join(GROUPINGS)}, got '{group}'")
    same = rule_equivalent(rule, jaccard_min) if group == "rules" else None
    out = []
    for pid, g in group_by_prompt(rows).items():
        answers = [r["answer"] for r in g]
        classes = group_answers(answers, same) if same else group_with_checker(answers, checker)
        shares, h = class_shares(classes)
        out += [r | {"score": round(s, 4), "class": c, "entropy": round(h, 4)} for r, s, c in zip(g, shares, classes)]
    return out


def score_file(samples: str | Path, out: str | Path, *, method: str, checker: str | None = None,
               group: str = "rules", rule: str = "jaccard", jaccard_min: float = 0.5,
               threshold: float | None = None, device: str = "auto") -> dict:
    """Score a samples file into ``out``; returns a summary (mean score, claims, entropy)."""
    from ..rundir import write_jsonl
    from .checkers import load_checker
    from .scoring import RULES

    rows = read_samples(samples)
    check_scorable(rows, method, str(samples))
    if method == "free" and group == "rules" and rule not in RULES:
        raise LmforgeError(f"rule: choose from {', '.join(RULES)}, got '{rule}'")
    need_checker = method == "reference" or group == "nli"
    if need_checker and not checker:
        raise LmforgeError("--checker is required (an NLI checker folder or embedding:MODEL)")
    chk = load_checker(checker, threshold=threshold, device=device) if need_checker else None
    scored = score_rows(rows, method, chk, group=group, rule=rule, jaccard_min=jaccard_min)
    write_jsonl(out, scored)
    summary = {"answers": len(scored), "mean_score": round(sum(r["score"] for r in scored) / len(scored), 4),
               "out": str(out)}
    if method == "reference":
        summary |= {"claims": sum(r["claims"] for r in scored), "supported": sum(r["supported"] for r in scored)}
    else:
        from .pairs import group_by_prompt

        ents = [g[0]["entropy"] for g in group_by_prompt(scored).values()]
        summary["mean_entropy"] = round(sum(ents) / len(ents), 4)
    return summary


def pairs_file(scored: str | Path, out: str | Path, *, margin: float = 0.0, sft_out: str | Path | None = None,
               max_pairs_per_prompt: int | None = None, exclude: str | Path | None = None) -> dict:
    """Preference pairs (and optionally SFT targets) from a scored file. ``exclude``: a prompt
    file whose prompts must not appear (held-out questions): refused in one line if they do."""
    from ..data.readers import read_table
    from ..rundir import write_jsonl
    from .data import read_prompts
    from .pairs import best_answers, build_pairs

    table = read_table(str(scored))
    rows = table.records
    if not rows:
        raise LmforgeError(f"{scored}: no scored answers (empty file)")
    for i, r in enumerate(rows):
        if not isinstance(r.get("score"), (int, float)) or isinstance(r.get("score"), bool):
            raise LmforgeError(f"{table.where(i)}: missing numeric 'score' (run `lmforge factuality score` first)")
        if not isinstance(r.get("answer"), str) or not r["answer"].strip():
            raise LmforgeError(f"{table.where(i)}: empty answer")
    if exclude is not None:
        banned = {p["prompt"] for p in read_prompts(exclude)}
        hit = next((r["prompt"] for r in rows if r["prompt"] in banned), None)
        if hit is not None:
            raise LmforgeError(f"{scored}: held-out prompt in the scored answers: {hit[:60]!r}")
    pairs = build_pairs(rows, margin, max_pairs_per_prompt=max_pairs_per_prompt)
    if not pairs:
        raise LmforgeError(f"{scored}: no pair of answers differs by more than margin={margin}")
    write_jsonl(out, pairs)
    summary = {"pairs": len(pairs), "prompts_with_pairs": len({p["id"] for p in pairs}), "out": str(out)}
    if sft_out is not None:
        best = best_answers(rows)
        write_jsonl(sft_out, best)
        summary["sft_targets"] = len(best)
    return summary


def compare_files(before: str | Path, after: str | Path, *, checker: str, threshold: float | None = None,
                  n_boot: int = 2000, seed: int = 0, device: str = "auto") -> dict:
    """Paired before/after figures of two answer files over the same prompts (matched by ``id``,
    each row with ``answer`` and ``references``): supported fraction, answers with an unsupported
    claim, length, claims -- each with a paired bootstrap 95% interval. Empty answers count as
    zero claims."""
    from ..data.readers import read_table
    from .checkers import load_checker
    from .evaluate import answer_metrics, compare

    tables = [read_table(str(p)) for p in (before, after)]
    keyed = []
    for path, t in zip((before, after), tables):
        rows = {}
        for i, r in enumerate(t.records):
            if not isinstance(r.get("answer"), str):
                raise LmforgeError(f"{t.where(i)}: missing text 'answer'")
            refs = r.get("references")
            if not isinstance(refs, list) or not refs:
                raise LmforgeError(f"{t.where(i)}: no 'references' to check against")
            rows[str(r.get("id", r.get("prompt")))] = r
        keyed.append(rows)
    ids = [k for k in keyed[0] if k in keyed[1]]
    if not ids:
        raise LmforgeError(f"{before} and {after}: no prompt in common")
    chk = load_checker(checker, threshold=threshold, device=device)
    refs = [keyed[0][k]["references"] for k in ids]
    m0 = answer_metrics([keyed[0][k]["answer"] for k in ids], refs, chk)
    m1 = answer_metrics([keyed[1][k]["answer"] for k in ids], refs, chk)
    return {"prompts": len(ids), "checker": checker} | compare(m0, m1, n_boot=n_boot, seed=seed)
