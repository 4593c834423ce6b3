"""Chunks map back to their source text; overlap and grouping behave as documented."""
from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.search.chunking import chunk_document, paragraph_spans, sentence_spans

from ._helpers import corpus

TEXT = "First one here. Second (really!) two? Third \"quoted.\"  Fourth\nline five.\n\nNew para six."


def test_sentence_spans_by_hand():
    spans = [TEXT[s:e] for s, e in sentence_spans(TEXT)]
    assert spans == ["First one here.", "Second (really!) two?", "Third \"quoted.\"", "Fourth", "line five.",
                     "New para six."]


def test_paragraph_spans():
    assert [TEXT[s:e] for s, e in paragraph_spans(TEXT)][-1] == "New para six."
    assert len(paragraph_spans(TEXT)) == 2


@pytest.mark.parametrize("mode,size,overlap", [("sentences", 1, 0), ("sentences", 3, 1), ("paragraphs", 1, 0),
                                               ("tokens", 5, 2), ("none", 1, 0)])
def test_offsets_map_back_to_the_source(tiny_bert_dir, mode, size, overlap):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    for doc_id, text in corpus(12) + [("x", TEXT)]:
        chunks = chunk_document(doc_id, text, mode=mode, size=size, overlap=overlap, tokenizer=tok)
        assert chunks
        for c in chunks:
            assert c.doc_id == doc_id and text[c.start:c.end] == c.text and c.text == c.text.strip()
        assert chunks[0].start == len(text) - len(text.lstrip())
        assert chunks[-1].end == len(text.rstrip())  # the whole document is covered


def test_token_windows_overlap_by_the_asked_tokens(tiny_bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    text = " ".join(f"w{i}" for i in range(12))
    chunks = chunk_document("t", text, mode="tokens", size=5, overlap=2, tokenizer=tok)
    assert [c.text for c in chunks] == ["w0 w1 w2 w3 w4", "w3 w4 w5 w6 w7", "w6 w7 w8 w9 w10", "w9 w10 w11"]


def test_sentence_groups_with_overlap():
    text = "A a. B b. C c. D d. E e."
    got = [c.text for c in chunk_document("s", text, mode="sentences", size=2, overlap=1)]
    assert got == ["A a. B b.", "B b. C c.", "C c. D d.", "D d. E e."]


@pytest.mark.parametrize("kw", [dict(mode="words"), dict(size=0), dict(size=2, overlap=2), dict(overlap=-1)])
def test_bad_chunking_settings(kw):
    with pytest.raises(LmforgeError):
        chunk_document("d", "text.", **kw)
