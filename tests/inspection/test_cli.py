"""``lmforge tokenize``, ``lmforge inspect`` and ``lmforge word2vec`` end to end on tiny models, and
their bad-input one-liners (exit 2)."""
from __future__ import annotations

import json
import random
from html.parser import HTMLParser

import pytest
from conftest import WORDS

from lmforge.cli import main


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error:"), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


# ---- tokenize -------------------------------------------------------------------------------------
def test_tokenize_side_by_side(tiny_bert_dir, tiny_llama_dir, tmp_path, capsys):
    html = tmp_path / "tok.html"
    assert main(["tokenize", str(tiny_bert_dir), str(tiny_llama_dir), "the movie was zzz !", "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert f"== {tiny_bert_dir.name}: 7 tokens" in out and f"== {tiny_llama_dir.name}:" in out
    assert "unknown ['zzz']" in out
    p = _Tags()
    p.feed(html.read_text())
    assert p.tags.count("span") >= 7 + 5 and "table" in p.tags

    assert main(["tokenize", str(tiny_bert_dir), "the movie", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["views"][0]
    assert got["pieces"] == ["[CLS]", "the", "movie", "[SEP]"] and got["round_trip"] is True


def test_tokenize_cost_over_a_file(tiny_bert_dir, tiny_llama_dir, tmp_path, capsys):
    lines = ["the movie was good", "a very boring plot ."]
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n\n")
    assert main(["tokenize", str(tiny_bert_dir), str(tiny_llama_dir), "--input", str(tmp_path / "d.txt"),
                 "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)["cost"]
    assert [c["words"] for c in cost] == [9, 9] and [c["tokens"] for c in cost] == [9, 9]
    assert cost[0]["tokens_per_char"] == pytest.approx(9 / sum(map(len, lines)), abs=1e-4)
    assert main(["tokenize", str(tiny_bert_dir), "--input", str(tmp_path / "d.txt")]) == 0
    assert "cheapest for this data" in capsys.readouterr().out


def test_tokenize_bad_input(tiny_bert_dir, tmp_path, capsys):
    assert main(["tokenize", str(tiny_bert_dir), "   "]) == 2
    _one_line_error(capsys, "empty")
    assert main(["tokenize", "only-a-text"]) == 2
    _one_line_error(capsys, "at least one model")
    (tmp_path / "e.txt").write_text("\n\n")
    assert main(["tokenize", str(tiny_bert_dir), "--input", str(tmp_path / "e.txt")]) == 2
    _one_line_error(capsys, "e.txt")


# ---- inspect --------------------------------------------------------------------------------------
def test_inspect_causal_writes_page_png_and_json(tiny_llama_dir, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "insp"
    assert main(["inspect", str(tiny_llama_dir), "the movie was very", "--out", str(out), "--temperature", "0.5",
                 "--steps", "3", "--layer", "1", "--head", "2", "--kv-tokens", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert sum(t["prob"] for t in res["next"]["top"]) <= 1 + 1e-6
    assert res["next"]["top_t"][0]["prob"] >= res["next"]["top"][0]["prob"]
    assert len(res["steps"]) == 3 and res["lens"]["max_diff"] < 1e-5 and len(res["lens"]["top"]) == 3
    w = res["attention"]["weights"]
    assert (res["attention"]["layer"], res["attention"]["head"]) == (1, 2)
    assert all(abs(sum(r) - 1) < 1e-5 for r in w) and res["kv"]["same_tokens"] is True
    png = out / "attention_l1_h2.png"
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 100
        extrema = im.convert("L").getextrema()
    assert extrema[0] < extrema[1]  # not blank
    page = (out / "inspect.html").read_text()
    p = _Tags()
    p.feed(page)
    assert "img" in p.tags and "Logit lens" in page and "KV cache" in page
    assert json.loads((out / "inspect.json").read_text())["tokens"] == res["tokens"]

    assert main(["inspect", str(tiny_llama_dir), "the movie", "--views", "next", "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "next token" in text and "step 2:" in text and "--out DIR" in text


def test_inspect_encoder_mask_fills(tiny_bert_dir, tmp_path, capsys):
    assert main(["inspect", str(tiny_bert_dir), "the [MASK] was good", "--json", "--top-k", "3",
                 "--out", str(tmp_path / "enc")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["views"] == ["mask", "attention"] and len(res["mask"]["fills"]) == 3  # embeddings + 2 layers
    assert all(len(f[0]) == 3 for f in res["mask"]["fills"])
    assert (tmp_path / "enc" / "attention_l1_h0.png").is_file()
    # what the error for an encoder without [MASK] suggests works
    assert main(["inspect", str(tiny_bert_dir), "the movie was good", "--views", "attention", "--head", "3",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["views"] == ["attention"] and res["attention"]["head"] == 3 and len(res["attention"]["weights"]) == 6


def test_inspect_chat_template(tiny_llama_dir, capsys):
    assert main(["inspect", str(tiny_llama_dir), "good movie", "--chat", "--views", "next", "--steps", "1",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    toks = res["tokens"]  # the rendered template: <|im_start|> user : good movie <|im_end|> <|im_start|> assistant :
    assert toks.count(":") == 2 and toks[-1] == ":" and toks[toks.index(":") + 1:toks.index(":") + 3] == ["good", "movie"]


def test_inspect_bad_input(tiny_llama_dir, tiny_bert_dir, capsys):
    assert main(["inspect", str(tiny_llama_dir), "  "]) == 2
    _one_line_error(capsys, "prompt is empty")
    assert main(["inspect", str(tiny_bert_dir), "the movie was"]) == 2
    _one_line_error(capsys, "without a next-token LM head", "what works", "[MASK]", "--views attention")
    assert main(["inspect", str(tiny_llama_dir), "the movie", "--layer", "2"]) == 2
    _one_line_error(capsys, "--layer 2 is out of range", "2 layers")
    assert main(["inspect", str(tiny_llama_dir), "the movie", "--head", "-5"]) == 2
    _one_line_error(capsys, "--head -5 is out of range")
    assert main(["inspect", str(tiny_llama_dir), "the movie", "--views", "mask"]) == 2
    _one_line_error(capsys, "causal LM")
    assert main(["inspect", str(tiny_llama_dir), "the movie", "--views", "nope"]) == 2
    _one_line_error(capsys, "unknown view")
    assert main(["inspect", str(tiny_llama_dir), "the movie", "--temperature", "0"]) == 2
    _one_line_error(capsys, "temperature")


def test_inspect_refuses_encoder_decoder(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
                               ).save_pretrained(tmp_path / "t5")
    assert main(["inspect", str(tmp_path / "t5"), "hello"]) == 2
    _one_line_error(capsys, "encoder-decoder", "tokenize")


# ---- word2vec -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    tmp = tmp_path_factory.mktemp("w2v")
    words = WORDS[:20]
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)]
    (tmp / "c.txt").write_text("\n".join(lines) + "\n")
    (tmp / "a.tsv").write_text("good great bad awful adj\nmovie film actor plot noun\nthe a an zzzz x\n")
    return tmp


def test_word2vec_train_similar_analogy(corpus, tiny_bert_dir, capsys):
    out = corpus / "v.bin"
    assert main(["word2vec", "train", str(corpus / "c.txt"), "--out", str(out), "--dim", "8", "--min-count", "2",
                 "--epochs", "2", "--arch", "cbow"]) == 0
    assert "words x 8 dims" in capsys.readouterr().out and out.read_bytes().startswith(b"20 8\n")
    assert main(["word2vec", "similar", str(out), "movie", "--topn", "3", "--vs", str(tiny_bert_dir), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert len(got[str(out)]) == 3 and len(got[str(tiny_bert_dir)]) == 3
    assert "movie" not in [w for w, _ in got[str(out)]]
    assert main(["word2vec", "analogy", str(out), "good", "great", "bad", "--topn", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[str(out)]) == 2
    assert main(["word2vec", "analogy", str(out), "--file", str(corpus / "a.tsv"), "--vs", str(tiny_bert_dir),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[str(out)]["all"]["questions"] == 3 and res[str(out)]["all"]["skipped"] == 1
    assert res[str(out)]["covered_by_all"]["questions"] == 2


def test_word2vec_bad_input(corpus, capsys):
    out = corpus / "v2.txt"
    assert main(["word2vec", "train", str(corpus / "c.txt"), "--out", str(out), "--dim", "4", "--min-count", "1",
                 "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["word2vec", "similar", str(out), "zzzz"]) == 2
    _one_line_error(capsys, "'zzzz' is not in the vocabulary")
    assert main(["word2vec", "analogy", str(out), "good", "great"]) == 2
    _one_line_error(capsys, "three words")
    assert main(["word2vec", "train", str(corpus / "c.txt"), "--out", str(corpus / "x.bin"), "--min-count",
                 "100000"]) == 2
    _one_line_error(capsys, "min_count")
    assert not (corpus / "x.bin").exists()
