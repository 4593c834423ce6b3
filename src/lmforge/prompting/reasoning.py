"""Reasoning by prompting: direct answers, chain-of-thought with answer extraction,
self-consistency (Wang et al. 2023) and a breadth-limited tree of thoughts (Yao et al. 2023).

- Chain-of-thought: the model writes its reasoning, then ``The answer is X``; :func:`extract_answer`
  takes X (or, failing that, the last number / option letter in the text).
- Self-consistency: k sampled chains per question, answers extracted, the majority answer wins;
  ``agreement = votes(winner) / k`` (0 when no sample yields an answer).
- Tree of thoughts: from the question, ``branch`` candidate next thoughts are sampled per kept path,
  each path is rated 1-5 by the model (a constrained choice, so the rating always parses), the
  ``breadth`` best are kept, ``depth`` times; the best path is then finished with an answer.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Sequence

from ..errors import LmforgeError

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_ANSWER_CUE = re.compile(r"(?:answer\s*(?:is|:)|=|equals)\s*\**\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_CHOICE_CUE = re.compile(r"answer\s*(?:is|:)\s*\**\s*\(?([A-E])\b", re.IGNORECASE)


def normalise_number(text: str) -> str | None:
    """``"1,200.50"`` -> ``"1200.5"``; ``"7.0"`` -> ``"7"``; None when not a number."""
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str, kind: str = "number") -> str | None:
    """The final answer in a model's text.

    Args:
        text: generated reasoning.
        kind: ``number`` (the number after "answer is"/"Answer:"/"=", else the last number) or
            ``choice`` (an option letter A-E after "answer is", else the first standalone letter).

    Returns:
        The normalised answer, or None when the text holds none.
    """
    if kind == "number":
        cued = _ANSWER_CUE.findall(text)
        found = cued[-1] if cued else (re.findall(_NUMBER, text) or [None])[-1]
        return normalise_number(found) if found else None
    if kind == "choice":
        m = _CHOICE_CUE.search(text) or re.search(r"(?:^|[\s(])([A-E])(?:[).:\s]|$)", text)
        return m.group(1).upper() if m else None
    raise LmforgeError(f"answer kind must be 'number' or 'choice', got '{kind}'")


DIRECT = "{question}\nReply with only the final answer."
COT = "{question}\nThink step by step, then finish with 'The answer is' and the answer."


def _count_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


@dataclasses.dataclass
class Answer:
    """One question's outcome: the voted answer, the agreement, and every sample with its tokens."""

    answer: str | None
    agreement: float
    samples: list[str]
    answers: list[str | None]
    tokens: int


def majority(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """The most common non-None answer (ties: the first to appear) and its share of all samples."""
    votes = collections.Counter(a for a in answers if a is not None)
    if not votes:
        return None, 0.0
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return winner, top / len(answers)


def answer_questions(model, tokenizer, questions: Sequence[str], *, method: str = "cot", k: int = 1,
                     kind: str = "number", max_new_tokens: int = 128, temperature: float = 0.7,
                     seed: int = 0, batch_size: int = 8) -> list[Answer]:
    """Answer each question by ``direct`` prompting, chain-of-thought (``cot``, greedy) or
    self-consistency (``sc``: ``k`` sampled chains, majority vote).

    Returns:
        One :class:`Answer` per question; ``tokens`` counts every generated token (all k samples).
    """
    from ..generation import GenerationConfig, generate

    if method not in ("direct", "cot", "sc"):
        raise LmforgeError(f"method must be direct, cot or sc, got '{method}'")
    if method == "sc" and (not isinstance(k, int) or k < 1):
        raise LmforgeError(f"self-consistency needs k >= 1 samples, got {k!r}")
    template = DIRECT if method == "direct" else COT
    prompts = [template.format(question=q) for q in questions]
    if method == "sc":
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95, seed=seed,
                               batch_size=max(k, batch_size // k * k))
        texts = generate(model, tokenizer, [p for p in prompts for _ in range(k)], cfg)
        groups = [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
    else:
        cfg = GenerationConfig(max_new_tokens=32 if method == "direct" else max_new_tokens, batch_size=batch_size)
        groups = [[t] for t in generate(model, tokenizer, prompts, cfg)]
    out = []
    for samples in groups:
        answers = [extract_answer(s, kind) for s in samples]
        winner, agreement = majority(answers)
        out.append(Answer(winner, agreement, samples, answers, sum(_count_tokens(tokenizer, samples))))
    return out


# ---- tree of thoughts -------------------------------------------------------------------------------
RATE = ("Question: {question}\nPartial reasoning:\n{path}\n"
        "How promising is this reasoning for answering the question correctly? Reply with one digit, "
        "1 (hopeless) to 5 (certainly right).")
STEP = "{question}\nThink step by step. Write only the next step of the reasoning.\n{path}"
FINISH = "{question}\nReasoning:\n{path}\nFinish with 'The answer is' and the answer."


def tree_of_thought(model, tokenizer, question: str, *, breadth: int = 2, branch: int = 3, depth: int = 2,
                    kind: str = "number", max_step_tokens: int = 48, seed: int = 0) -> dict:
    """Breadth-limited search over reasoning steps rated by the model itself.

    Returns:
        ``{"answer", "best_path", "tree": [{"depth", "path", "rating"}...], "tokens"}``.
    """
    from ..generation import GenerationConfig, generate
    from .constrained import Constraint, generate_constrained

    if min(breadth, branch, depth) < 1:
        raise LmforgeError("tree of thought needs breadth, branch and depth >= 1")
    rate = Constraint.choice(["1", "2", "3", "4", "5"])
    frontier: list[tuple[str, float]] = [("", 0.0)]
    tree, tokens = [], 0
    for level in range(depth):
        cfg = GenerationConfig(max_new_tokens=max_step_tokens, temperature=0.8, top_p=0.95, seed=seed + level,
                               stop=["\n"], batch_size=branch * len(frontier))
        prompts = [STEP.format(question=question, path=p) for p, _ in frontier for _ in range(branch)]
        steps = generate(model, tokenizer, prompts, cfg)
        tokens += sum(_count_tokens(tokenizer, steps))
        paths = [(p + s.strip() + "\n") for (p, _), s in zip([f for f in frontier for _ in range(branch)], steps)]
        paths = list(dict.fromkeys(p for p in paths if p.strip()))  # distinct, non-empty
        if not paths:
            break
        ratings = generate_constrained(model, tokenizer, [RATE.format(question=question, path=p) for p in paths],
                                       GenerationConfig(max_new_tokens=2, batch_size=len(paths)), rate)
        tokens += len(paths)
        scored = [(p, float(r)) for p, r in zip(paths, ratings)]
        tree += [{"depth": level + 1, "path": p, "rating": r} for p, r in scored]
        frontier = sorted(scored, key=lambda x: -x[1])[:breadth]
    best = frontier[0][0]
    final = generate(model, tokenizer, [FINISH.format(question=question, path=best)],
                     GenerationConfig(max_new_tokens=64))[0]
    tokens += sum(_count_tokens(tokenizer, [final]))
    return {"answer": extract_answer(final, kind), "best_path": best + final, "tree": tree, "tokens": tokens}
