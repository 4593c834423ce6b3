"""Before/after measurements on held-out prompts, with paired bootstrap intervals.

Greedy answers of held-out questions are scored against their references (claims supported,
see :mod:`.scoring`); per question ``i``: ``f_i = S_i / K_i`` (0 for an empty answer),
``u_i = 1[U_i >= 1]`` and the answer length ``L_i`` in words. A change ``mean(after) -
mean(before)`` gets a paired bootstrap 95% interval: resample the questions with replacement
``B`` times (seeded), keep both measurements of each drawn question, take the 2.5/97.5
percentiles of the resampled mean differences.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .claims import word_count
from .scoring import support_scores


def paired_bootstrap(before: Sequence[float], after: Sequence[float], *, n_boot: int = 2000,
                     seed: int = 0) -> dict:
    """``{"before", "after", "change", "low", "high"}``: means, their difference and its 95% interval.

    ``d_b = mean_{i in I_b}(after_i - before_i)`` for ``B`` index draws ``I_b`` of size n."""
    x, y = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)  # (n,), (n,)
    d = y - x
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))  # (B, n)
    boot = d[idx].mean(axis=1)  # (B,)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"before": round(float(x.mean()), 4), "after": round(float(y.mean()), 4),
            "change": round(float(d.mean()), 4), "low": round(float(lo), 4), "high": round(float(hi), 4)}


def answer_metrics(answers: Sequence[str], references: Sequence[Sequence[str]], checker,
                   questions: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Per-answer ``supported_fraction``, ``any_unsupported``, ``length_words``, ``claims``; with the
    questions also ``informative_fraction`` (I / K: supported and not entailed by the question
    alone) and ``echo_fraction`` (E / K: claims the question alone entails), see :mod:`.scoring`."""
    sup = support_scores(answers, references, checker, allow_empty=True, questions=questions)
    out = {"supported_fraction": [s.score for s in sup],
           "any_unsupported": [float(s.unsupported > 0) for s in sup],
           "length_words": [float(word_count(a)) for a in answers],
           "claims": [float(len(s.claims)) for s in sup]}
    if questions is not None:
        out["informative_fraction"] = [s.informative / len(s.claims) if s.claims else 0.0 for s in sup]
        out["echo_fraction"] = [s.echoed / len(s.claims) if s.claims else 0.0 for s in sup]
    return out


def compare(before: dict[str, list[float]], after: dict[str, list[float]], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap of every metric present in both."""
    return {k: paired_bootstrap(before[k], after[k], n_boot=n_boot, seed=seed) for k in before if k in after}


def preference_correct(model, tokenizer, rows: Sequence[dict], batch_size: int = 8) -> list[float]:
    """1 where the model gives the chosen completion a higher total log-probability than the
    rejected one, else 0 (each row: ``prompt``, ``chosen``, ``rejected``)."""
    from .sampler import answer_logprobs

    prompts = [r["prompt"] for r in rows]
    c = answer_logprobs(model, tokenizer, prompts, [r["chosen"] for r in rows], batch_size=batch_size)
    r = answer_logprobs(model, tokenizer, prompts, [r["rejected"] for r in rows], batch_size=batch_size)
    return [float(a[0] > b[0]) for a, b in zip(c, r)]
