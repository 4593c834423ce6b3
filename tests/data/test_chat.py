"""Chat formatting, target masking, truncation accounting, packing and collation."""
from __future__ import annotations

import pytest
import torch

from conftest import build_word_tokenizer
from lmforge.data.chat import (IGNORE, DropReport, Formatter, collate_causal, looks_like_hh, make_item,
                               next_token_targets, pack_items, parse_hh_dialogue, prompt_messages,
                               truncate_prompt_left, truncate_right)
from lmforge.errors import LmforgeError


@pytest.fixture(scope="module")
def tok():
    """The tiny Llama tokenizer: its template ends turns with <|im_end|>, its EOS is </s>."""
    return build_word_tokenizer("llama")[0]


@pytest.fixture(scope="module")
def chatml_tok():
    """A ChatML-like tokenizer whose EOS is the template's end-of-turn, followed by a '.' token."""
    t = build_word_tokenizer("llama")[0]
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.eos_token = "<|im_end|>"
    t.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} : {{ m['content'] }} <|im_end|> . "
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant : {% endif %}")
    return t


def toks(t, ids):
    return t.convert_ids_to_tokens(ids)


# ---- HH transcripts ---------------------------------------------------------------------------------
def test_parse_hh_dialogue_splits_turns_and_drops_the_final_cue():
    text = "Human: what is a plot?\n\nAssistant: the story.\n\nHuman: and an actor?\n\nAssistant:"
    assert parse_hh_dialogue(text) == [
        {"role": "user", "content": "what is a plot?"},
        {"role": "assistant", "content": "the story."},
        {"role": "user", "content": "and an actor?"},
    ]
    assert looks_like_hh(text) and looks_like_hh("\n\n" + text)
    assert not looks_like_hh("what is a plot?")


def test_parse_hh_dialogue_rejects_non_transcripts():
    with pytest.raises(LmforgeError, match="HH transcript"):
        parse_hh_dialogue("Assistant: hello")


def test_prompt_messages_styles():
    hh = "Human: good movie\n\nAssistant:"
    assert prompt_messages(hh, "auto") == [{"role": "user", "content": "good movie"}]
    assert prompt_messages(hh, "plain") == [{"role": "user", "content": hh}]
    msgs = [{"role": "user", "content": "a"}]
    assert prompt_messages(msgs) == msgs
    with pytest.raises(LmforgeError, match="role"):
        prompt_messages([{"role": "user"}])


# ---- masking and EOS ----------------------------------------------------------------------------------
def test_completion_trained_through_template_eos_not_after(chatml_tok):
    f = Formatter.create(chatml_tok)
    p, c, lab = f.encode_completion("good movie", "great plot")
    # (role names are not in the tiny vocabulary: <unk>)
    assert toks(chatml_tok, p) == ["<|im_start|>", "<unk>", ":", "good", "movie", "<|im_end|>", ".",
                                   "<|im_start|>", "<unk>", ":"]
    assert toks(chatml_tok, c) == ["great", "plot", "<|im_end|>", "."]
    assert lab == c[:3] + [IGNORE]  # the '.' after EOS is context, not a target
    # generation sees exactly these prompt tokens
    from lmforge.generation import encode_prompts

    assert encode_prompts(chatml_tok, [f.generation_prompt("good movie")], chat=True)[0] == p


def test_eos_appended_when_template_has_none(tok):
    f = Formatter.create(tok)
    p, c, lab = f.encode_completion("good movie", "great plot")
    assert c[-1] == tok.eos_token_id and lab == c
    assert toks(tok, c)[:2] == ["great", "plot"]


def test_messages_only_assistant_turns_are_targets(chatml_tok):
    f = Formatter.create(chatml_tok)
    msgs = [{"role": "user", "content": "good"}, {"role": "assistant", "content": "bad film"},
            {"role": "user", "content": "the plot"}, {"role": "assistant", "content": "dull"}]
    ids, labels = f.encode_messages(msgs)
    full = chatml_tok(chatml_tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids == full  # segment-wise tokenisation reproduces the whole conversation
    trained = [t for t, y in zip(toks(chatml_tok, ids), labels) if y != IGNORE]
    assert trained == ["bad", "film", "<|im_end|>", "dull", "<|im_end|>"]
    assert all(y in (IGNORE, i) for i, y in zip(ids, labels))
    ids_all, labels_all = f.encode_messages(msgs, train_on="all")
    assert ids_all == ids and labels_all == ids


def test_messages_errors(tok):
    f = Formatter.create(tok)
    with pytest.raises(LmforgeError, match="no assistant"):
        f.encode_messages([{"role": "user", "content": "good"}])
    with pytest.raises(LmforgeError, match="start with an assistant"):
        f.encode_messages([{"role": "assistant", "content": "good"}])
    raw = Formatter.create(tok, template="raw")
    with pytest.raises(LmforgeError, match="chat template"):
        raw.encode_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_raw_mode_and_text(tok):
    f = Formatter.create(tok, template="raw")
    assert not f.chat
    p, c, lab = f.encode_completion("good movie", "great plot")
    assert toks(tok, p) == ["good", "movie"] and toks(tok, c) == ["great", "plot", "</s>"] and lab == c
    ids, labels = f.encode_text("a dull film")
    assert toks(tok, ids) == ["a", "dull", "film", "</s>"] and labels == ids


def test_chat_template_required_for_chat():
    t = build_word_tokenizer("llama")[0]
    t.chat_template = None
    with pytest.raises(LmforgeError, match="no chat template"):
        Formatter.create(t, template="chat")
    assert not Formatter.create(t).chat


# ---- targets, truncation, reports -------------------------------------------------------------------------
def test_next_token_targets_and_make_item():
    assert next_token_targets([5, IGNORE, 7, 8]) == [IGNORE, 7, 8, IGNORE]
    item = make_item([1, 2, 3], [IGNORE, IGNORE, 3])
    assert item == {"input_ids": [1, 2, 3], "targets": [IGNORE, 3, IGNORE]}
    assert make_item([1, 2, 3], [IGNORE, IGNORE, IGNORE]) is None
    assert make_item([1], [1]) is None  # a lone token predicts nothing


def test_truncation_that_removes_every_target_drops_the_sample():
    ids, labels = list(range(10)), [IGNORE] * 8 + [8, 9]
    ids2, labels2, cut = truncate_right(ids, labels, 8)
    assert cut and len(ids2) == 8 and make_item(ids2, labels2) is None
    assert truncate_right(ids, labels, 10)[2] is False


def test_prompt_left_truncation_keeps_the_reply():
    ids, labels = list(range(10)), [IGNORE] * 8 + [8, 9]          # 8 prompt tokens, a 2-token reply
    ids2, labels2, cut = truncate_prompt_left(ids, labels, 5)      # excess 5 <= p - 1 = 7: prompt 0..4 go
    assert cut and ids2 == [5, 6, 7, 8, 9] and labels2 == [IGNORE] * 3 + [8, 9]
    assert make_item(ids2, labels2)["targets"] == [IGNORE, IGNORE, 8, 9, IGNORE]
    ids3, labels3, _ = truncate_prompt_left(ids, labels, 2)       # excess 8 > 7: one prompt token stays,
    assert ids3 == [7, 8] and labels3 == [IGNORE, 8]                # then the reply is cut on the right
    assert make_item(ids3, labels3)["targets"] == [8, IGNORE]      # (right truncation would keep no target)
    assert truncate_prompt_left(ids, labels, 10) == (ids, labels, False)
    assert truncate_prompt_left([1, 2, 3], [1, 2, 3], 2) == ([1, 2], [1, 2], True)   # train_on all: p = 0


def test_drop_report_names_the_first_example():
    rep = DropReport("train", total=5, truncated=2)
    rep.drop("no trainable token", "data.jsonl line 3")
    rep.drop("no trainable token", "data.jsonl line 4")
    lines = rep.lines()
    assert lines[0] == "train: 2 of 5 samples truncated to the max length"
    assert lines[1] == "train: dropped 2 of 5 samples: no trainable token (first: data.jsonl line 3)"
    assert rep.n_dropped == 2 and rep.as_dict()["dropped"]["no trainable token"]["first"] == "data.jsonl line 3"


# ---- packing and collation ------------------------------------------------------------------------------
def _items(lengths):
    out = []
    for k, n in enumerate(lengths):
        ids = [100 * (k + 1) + j for j in range(n)]
        out.append({"input_ids": ids, "targets": ids[1:] + [IGNORE]})
    return out


def test_pack_items_keeps_samples_whole_with_restarting_positions():
    items = _items([5, 3, 7, 2, 6, 4])
    rows = pack_items(items, 10)
    assert all(len(r["input_ids"]) <= 10 for r in rows)
    assert sum(r["n_samples"] for r in rows) == len(items)
    assert len(rows) == 3  # 27 tokens fit three rows of 10 exactly by first-fit decreasing
    seen = []
    for r in rows:
        assert len(r["input_ids"]) == len(r["targets"]) == len(r["position_ids"])
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        bounds = starts + [len(r["input_ids"])]
        for a, b in zip(bounds, bounds[1:]):
            assert r["position_ids"][a:b] == list(range(b - a))
            assert items[r["sample_ids"][a]]["input_ids"] == r["input_ids"][a:b]
            assert len(set(r["sample_ids"][a:b])) == 1
            seen.append(r["input_ids"][a:b])
            assert r["targets"][b - 1] == IGNORE  # never predicts the next sample's first token
    assert sorted(seen) == sorted(it["input_ids"] for it in items)
    with pytest.raises(LmforgeError, match="does not fit"):
        pack_items(_items([11]), 10)


def test_collate_unpacked_and_packed():
    items = _items([3, 1])
    b = collate_causal(items, pad_id=0)
    assert b["input_ids"].tolist() == [[100, 101, 102], [200, 0, 0]]
    assert b["targets"].tolist() == [[101, 102, IGNORE], [IGNORE, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    rows = pack_items(_items([2, 2, 3]), 4)
    pb = collate_causal(rows, pad_id=0)
    assert "attention_mask" not in pb
    assert pb["position_ids"].shape == pb["input_ids"].shape
    for r, row in enumerate(rows):
        k = len(row["input_ids"])
        assert pb["position_ids"][r, :k].tolist() == row["position_ids"]
        assert pb["position_ids"][r, k:].tolist() == list(range(pb["input_ids"].shape[1] - k))
        assert pb["token_mask"][r].sum() == k
        assert pb["sample_ids"][r, :k].tolist() == row["sample_ids"] and (pb["sample_ids"][r, k:] == -1).all()
    assert collate_causal([{"input_ids": [1, 2]}], pad_id=0).keys() == {"input_ids", "attention_mask"}
    assert isinstance(b["input_ids"], torch.Tensor) and b["input_ids"].dtype == torch.long
