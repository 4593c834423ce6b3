"""RAG prompt assembly, citation parsing, and a grounded answer from a tiny generator."""
from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.search.rag import (CLOSED_BOOK_TEMPLATE, DEFAULT_TEMPLATE, answer_questions, build_prompt,
                                check_template, parse_citations, read_template)


def test_prompt_numbers_the_passages_in_order():
    p = build_prompt(" Is it good? ", ["First  passage\nwith lines.", "Second one."], "Q={question}\n{passages}")
    assert p == "Q=Is it good?\n[1] First passage with lines.\n\n[2] Second one."
    full = build_prompt("why?", ["a", "b", "c"])
    assert full.index("[1] a") < full.index("[2] b") < full.index("[3] c") < full.index("Question: why?")
    assert "[1]" in DEFAULT_TEMPLATE  # the instruction shows the citation format


@pytest.mark.parametrize("answer,n,expected", [
    ("Yes [1].", 3, [1]),
    ("It is [2][1], see [2].", 3, [2, 1]),
    ("Both [1, 3] and [2; 3]", 3, [1, 3, 2]),
    ("Range [1-3] and [2–4]", 4, [1, 2, 3, 4]),
    ("Out of range [7] and [0] and [abc] and (1)", 3, []),
    ("Passage[3]said so [ 2 ]", 3, [3, 2]),
    ("no citation", 3, []),
])
def test_parse_citations(answer, n, expected):
    assert parse_citations(answer, n) == expected


def test_templates_are_checked(tmp_path):
    check_template(CLOSED_BOOK_TEMPLATE, True)
    with pytest.raises(LmforgeError, match="must contain {passages}"):
        check_template("Q: {question}", False)
    with pytest.raises(LmforgeError, match="bad prompt template"):
        check_template("{question} {passages} {other}", False)
    (tmp_path / "t.txt").write_text("Context:\n{passages}\nQ: {question}\nA:")
    assert read_template(str(tmp_path / "t.txt")).startswith("Context:")
    with pytest.raises(LmforgeError, match="not found"):
        read_template(str(tmp_path / "missing.txt"))


def test_answers_from_a_tiny_generator_stream_and_cite(tiny_llama_dir):
    from lmforge.generation import GenerationConfig
    from lmforge.merge import Source, load_causal_lm

    model, tok, _ = load_causal_lm(Source(base=str(tiny_llama_dir)))
    hits = [{"doc_id": "d1", "start": 0, "end": 9, "chunk": 0, "text": "good film"},
            {"doc_id": "d2", "start": 3, "end": 8, "chunk": 4, "text": "bad plot"}]
    pieces: list[str] = []
    cfg = GenerationConfig(max_new_tokens=6)
    got = answer_questions(model, tok, ["is it good ?"], [hits], cfg, stream=pieces.append)[0]
    assert "".join(pieces).strip() == got.answer
    assert got.citations == parse_citations(got.answer, 2)
    # the prompt the generator saw: the same text a direct call produces
    from lmforge.generation import generate

    direct = generate(model, tok, [build_prompt("is it good ?", ["good film", "bad plot"])], cfg)[0]
    assert direct.strip() == got.answer
    cited = answer_questions(model, tok, ["q"], [hits], cfg)[0]
    cited.answer, cited.citations = "yes [2]", [2]
    assert cited.sources() == [{"n": 2} | hits[1]]
    closed = answer_questions(model, tok, ["is it good ?"], [[]], cfg, template=CLOSED_BOOK_TEMPLATE,
                              closed_book=True)[0]
    assert closed.passages == [] and closed.citations == []
