"""Retrieval-augmented generation: numbered passages into an editable prompt, a grounded answer
with ``[n]`` citations, and the citations parsed back to their sources.

The prompt template is plain ``str.format`` text with ``{question}`` and ``{passages}`` (closed
book: ``{question}`` only); passages are rendered ``[1] text``, ``[2] text`` ... so the model can
cite them. :func:`parse_citations` reads ``[1]``, ``[1, 3]``, ``[2][3]`` and ``[1-3]`` and keeps
the numbers that name a passage.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import LmforgeError

DEFAULT_TEMPLATE = (
    "Answer the question using only the numbered passages below. Cite the passages you use "
    "with their numbers in square brackets, like [1]. If the passages do not contain the answer, say so.\n\n"
    "{passages}\n\nQuestion: {question}"
)
CLOSED_BOOK_TEMPLATE = "Answer the question.\n\nQuestion: {question}"

_CITATION = re.compile(r"\[(\s*\d+(?:\s*(?:[,;]|-|–|and)\s*\d+)*\s*)\]")


def read_template(path: str | None, closed_book: bool = False) -> str:
    """The prompt template: a file's text, or the default; it must name the fields it needs."""
    template = CLOSED_BOOK_TEMPLATE if closed_book else DEFAULT_TEMPLATE
    if path:
        p = Path(path)
        if not p.is_file():
            raise LmforgeError(f"{path}: prompt template not found")
        template = p.read_text(encoding="utf-8")
    check_template(template, closed_book, path or "template")
    return template


def check_template(template: str, closed_book: bool, src: str = "template") -> None:
    need = ("{question}",) if closed_book else ("{question}", "{passages}")
    for f in need:
        if f not in template:
            raise LmforgeError(f"{src}: the prompt template must contain {f}")
    try:
        template.format(question="", passages="")
    except (KeyError, IndexError, ValueError) as exc:
        raise LmforgeError(f"{src}: bad prompt template ({type(exc).__name__}: {exc}); "
                           "only {question} and {passages} are filled (double other braces)") from None


def format_passages(passages: Sequence[str]) -> str:
    """``[1] first\\n\\n[2] second ...`` (white space inside a passage collapsed to one line)."""
    return "\n\n".join(f"[{n}] {' '.join(p.split())}" for n, p in enumerate(passages, start=1))


def build_prompt(question: str, passages: Sequence[str], template: str = DEFAULT_TEMPLATE) -> str:
    """The user prompt: ``template`` with the question and the numbered passages."""
    if not question.strip():
        raise LmforgeError("the question is empty")
    return template.format(question=question.strip(), passages=format_passages(passages))


def parse_citations(answer: str, n_passages: int) -> list[int]:
    """Passage numbers cited in ``answer`` (1-based, in order of first citation, each once);
    numbers outside ``1..n_passages`` are dropped."""
    out: list[int] = []
    for m in _CITATION.finditer(answer):
        body = re.sub(r"(\d+)\s*(?:-|–)\s*(\d+)", _expand_range, m.group(1))
        for tok in re.findall(r"\d+", body):
            n = int(tok)
            if 1 <= n <= n_passages and n not in out:
                out.append(n)
    return out


def _expand_range(m: re.Match) -> str:
    a, b = int(m.group(1)), int(m.group(2))
    return ",".join(str(x) for x in range(a, b + 1)) if 0 <= b - a <= 50 else f"{a},{b}"


@dataclass
class RagAnswer:
    question: str
    answer: str
    passages: list[dict] = field(default_factory=list)  # hits (see query.hits), in prompt order
    citations: list[int] = field(default_factory=list)  # 1-based passage numbers

    def sources(self) -> list[dict]:
        """The cited passages with their numbers."""
        return [{"n": n} | self.passages[n - 1] for n in self.citations]

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.answer, "citations": self.citations,
                "sources": self.sources()}


def answer_questions(model, tokenizer, questions: Sequence[str], passages: Sequence[Sequence[dict]], gen_cfg, *,
                     template: str = DEFAULT_TEMPLATE, closed_book: bool = False,
                     stream: Callable[[str], None] | None = None) -> list[RagAnswer]:
    """Generate an answer per question from its passages (``hits``: dicts with ``text``).

    The prompt goes through the tokenizer's chat template when it has one. ``stream`` prints the
    answer of a single question as it is generated.
    """
    from ..generation import generate

    if closed_book:
        prompts = [template.format(question=q.strip(), passages="") for q in questions]
    else:
        prompts = [build_prompt(q, [p["text"] for p in ps], template) for q, ps in zip(questions, passages)]
    texts = generate(model, tokenizer, prompts, gen_cfg, stream=stream)
    out = []
    for q, ps, t in zip(questions, passages, texts):
        ps = [] if closed_book else list(ps)
        out.append(RagAnswer(q, t.strip(), ps, parse_citations(t, len(ps))))
    return out
