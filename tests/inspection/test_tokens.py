"""Tokenizer views: spans, specials, unknown and byte-fallback pieces, round trip, corpus cost, rendering."""
from __future__ import annotations

from html.parser import HTMLParser

import pytest
from conftest import build_word_tokenizer

from lmforge.errors import LmforgeError
from lmforge.inspection import render, tokens


def byte_fallback_tokenizer():
    """SentencePiece-style BPE over single letters with <0xNN> byte pieces for everything else."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "▁": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")


def byte_level_tokenizer():
    """GPT-2-style byte-level BPE trained on a few words in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tk.train_from_iterator(["the movie was good", "the film was great"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def test_bert_style_view_specials_unknown_and_round_trip():
    tok, vocab = build_word_tokenizer("bert")
    v = tokens.view(tok, "the movie was zzz !", "bert")
    assert [t.piece for t in v.tokens] == ["[CLS]", "the", "movie", "was", "[UNK]", "!", "[SEP]"]
    assert v.ids[0] == vocab["[CLS]"] and v.specials == ["[CLS]", "[SEP]"]
    assert v.unknown == ["zzz"]
    assert len(v.content) == 5 and v.chars_per_token == pytest.approx(len("the movie was zzz !") / 5)
    assert not v.round_trip and v.decoded == "the movie was [UNK] !" and v.first_difference() == 14
    assert v.summary()["specials_added"] == ["[CLS]", "[SEP]"]


def test_word_level_round_trip_ok():
    tok, _ = build_word_tokenizer("bert")
    v = tokens.view(tok, "the movie was good", "w")
    assert v.round_trip and v.first_difference() is None and v.byte_pieces == 0 and not v.unknown


def test_sentencepiece_byte_fallback_pieces_are_counted():
    tok = byte_fallback_tokenizer()
    v = tokens.view(tok, "ab🦙", "sp")
    assert [t.piece for t in v.tokens] == ["a", "b", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert v.byte_pieces == 4 and v.round_trip and not v.unknown


def test_byte_level_bpe_partial_characters_are_byte_pieces():
    tok = byte_level_tokenizer()
    v = tokens.view(tok, "the movie 🦙", "bl")
    assert v.round_trip
    assert 2 <= v.byte_pieces <= 4  # the emoji's 4 UTF-8 bytes, none a whole character on its own
    assert all(t.byte == ("\ufffd" in t.text) for t in v.tokens)


def test_segments_cover_text_and_every_token_once():
    for tok, text in [(build_word_tokenizer("bert")[0], "the  movie was zzz!"), (byte_level_tokenizer(), "a 🦙 film")]:
        v = tokens.view(tok, text, "x")
        segs = tokens.segments(v)
        assert sorted(i for _, i in segs if i is not None) == list(range(len(v.tokens)))
        assert "".join(s for s, i in segs if i is None or not v.tokens[i].special) == text


def test_empty_text_is_an_error():
    tok, _ = build_word_tokenizer("bert")
    with pytest.raises(LmforgeError, match="empty"):
        tokens.view(tok, "  ", "x")


def test_cost_counts_by_hand():
    tok, _ = build_word_tokenizer("bert")
    texts = ["the movie was good!", "a zzz film"]
    c = tokens.cost(tok, texts, "bert")  # the movie was good ! | a [UNK] film
    assert (c.words, c.tokens, c.unknown, c.chars) == (7, 8, 1, 19 + 10)
    assert c.tokens_per_word == pytest.approx(8 / 7) and c.tokens_per_char == pytest.approx(8 / 29)
    assert c.round_trip_failures == 2  # "good !" and "[UNK]"
    with pytest.raises(LmforgeError):
        tokens.cost(tok, [], "bert")


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans, self.tables = 0, 0

    def handle_starttag(self, tag, attrs):
        self.spans += tag == "span" and ("title", None) != next((a for a in attrs if a[0] == "title"), None)
        self.tables += tag == "table"


def test_render_terminal_and_html():
    tok, _ = build_word_tokenizer("bert")
    v = tokens.view(tok, "the <b>movie</b>", "bert")
    colored = render.ansi_spans(v, colour=True)
    assert colored.count("\x1b[48;5;") == len(v.tokens)
    assert render.ansi_spans(v, colour=False).startswith("[[CLS]][the]")
    page = render.tokenize_page([v], [tokens.cost(tok, ["the movie"], "bert").row()])
    assert "<b>" not in page and "&lt;b&gt;" in page  # the text is escaped
    p = _Collect()
    p.feed(page)
    assert p.spans >= len(v.tokens) and p.tables == 2
