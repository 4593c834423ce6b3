"""Word vectors: word2vec files both ways with gensim (no pickle), 3CosAdd parity with gensim's
most_similar, training, analogy accuracy by hand, a model's input embeddings as a word table."""
from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import build_word_tokenizer

from lmforge.errors import LmforgeError
from lmforge.inspection import wordvec

gensim = pytest.importorskip("gensim")


def _table(n=40, d=8, seed=0) -> wordvec.WordVectors:
    rng = np.random.default_rng(seed)
    return wordvec.WordVectors([f"w{i}" for i in range(n)] + ["café", "naïve"], rng.normal(size=(n + 2, d)))


@pytest.mark.parametrize("name", ["v.bin", "v.txt"])
def test_save_load_round_trip_and_gensim_reads_it(tmp_path, name):
    wv = _table()
    wordvec.save(wv, tmp_path / name)
    raw = (tmp_path / name).read_bytes()
    assert raw.startswith(b"42 8\n") and not raw.startswith(b"\x80")  # word2vec header, not a pickle
    back = wordvec.load(tmp_path / name)
    assert back.words == wv.words
    tol = 0 if name.endswith(".bin") else 1e-5
    np.testing.assert_allclose(back.vectors, wv.vectors, atol=tol, rtol=tol)
    kv = gensim.models.KeyedVectors.load_word2vec_format(str(tmp_path / name), binary=name.endswith(".bin"))
    assert kv.index_to_key == wv.words
    np.testing.assert_allclose(kv.vectors, wv.vectors, atol=tol, rtol=tol)
    assert not list(tmp_path.glob(".tmp-*"))


def test_we_read_gensim_written_files(tmp_path):
    kv = gensim.models.KeyedVectors(5)
    rng = np.random.default_rng(1)
    kv.add_vectors(["a", "bb", "ccc", "ü"], rng.normal(size=(4, 5)).astype(np.float32))
    kv.save_word2vec_format(str(tmp_path / "g.bin"), binary=True)
    kv.save_word2vec_format(str(tmp_path / "g.txt"), binary=False)
    for f, tol in (("g.bin", 0), ("g.txt", 1e-6)):
        back = wordvec.load(tmp_path / f)
        assert back.words == ["a", "bb", "ccc", "ü"]
        np.testing.assert_allclose(back.vectors, kv.vectors, atol=tol, rtol=1e-5)


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "x.txt").write_text("not a header\n")
    with pytest.raises(LmforgeError, match="not a word2vec file"):
        wordvec.load(tmp_path / "x.txt")
    (tmp_path / "y.txt").write_text("2 3\na 1 2 3\nb 1 2\n")
    with pytest.raises(LmforgeError, match="malformed"):
        wordvec.load(tmp_path / "y.txt")
    with pytest.raises(LmforgeError, match="not found"):
        wordvec.load(tmp_path / "missing.bin")
    with pytest.raises(LmforgeError, match="whitespace"):
        wordvec.save(wordvec.WordVectors(["a b"], np.ones((1, 2))), tmp_path / "z.bin")


def test_similar_and_analogy_match_gensim():
    wv = _table(60, 6, seed=3)
    kv = gensim.models.KeyedVectors(6)
    kv.add_vectors(wv.words, wv.vectors)
    ours = wv.similar("w3", topn=7)
    theirs = kv.most_similar("w3", topn=7)
    assert [w for w, _ in ours] == [w for w, _ in theirs]
    np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], atol=1e-5)
    ours = wv.analogy("w1", "w2", "w5", topn=5)
    theirs = kv.most_similar(positive=["w2", "w5"], negative=["w1"], topn=5)
    assert [w for w, _ in ours] == [w for w, _ in theirs]
    np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], atol=1e-5)


def test_oov_word_is_an_error():
    with pytest.raises(LmforgeError, match="'nope' is not in the vocabulary"):
        _table().similar("nope")


def test_analogy_accuracy_by_hand():
    # 2-d vectors built so that b - a + c lands exactly on d for the first question only
    words = ["man", "woman", "king", "queen", "cat", "dog", "x"]
    vecs = np.array([[1, 0], [1, 1], [3, 0], [3, 1], [0, 5], [-5, 0.1], [0.2, -5]], dtype=float)
    wv = wordvec.WordVectors(words, vecs)
    rows = [("g", "man", "woman", "king", "queen"), ("g", "man", "woman", "king", "dog"),
            ("h", "cat", "dog", "man", "unknownword")]
    res = wordvec.evaluate_analogies(wv, rows)
    assert wv.analogy("man", "woman", "king", topn=1)[0][0] == "queen"
    assert res["correct"] == 1 and res["questions"] == 3 and res["skipped"] == 1
    assert res["accuracy"] == pytest.approx(1 / 3) and res["per_category"] == {"g": 0.5, "h": 0.0}
    assert wordvec.evaluate_analogies(wv, rows, only=[0])["accuracy"] == 1.0


def test_read_analogies(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_text("# comment\nman\twoman\tking\tqueen\tgender\n\nx y z w\n")
    assert wordvec.read_analogies(p) == [("gender", "man", "woman", "king", "queen"), ("all", "x", "y", "z", "w")]
    p.write_text("a b c\n")
    with pytest.raises(LmforgeError, match="line 1"):
        wordvec.read_analogies(p)


def test_train_is_reproducible_and_learns_cooccurrence():
    rng = random.Random(0)
    food, cars = [f"food{i}" for i in range(8)], [f"car{i}" for i in range(8)]
    sents = [rng.sample(food if i % 2 else cars, 5) for i in range(800)]
    a = wordvec.train(sents, dim=16, window=3, min_count=1, epochs=5, sample=0, seed=1)
    b = wordvec.train(sents, dim=16, window=3, min_count=1, epochs=5, sample=0, seed=1)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert sorted(w for w, _ in a.similar("food0", topn=7)) == food[1:]  # words sharing contexts are nearest
    with pytest.raises(LmforgeError, match="min_count"):
        wordvec.train([["a", "b"]], min_count=5)


def test_words_of():
    assert wordvec.words_of("Don't STOP, café 42!") == ["don't", "stop", "café", "42"]


def test_input_embeddings_as_word_table():
    tok, vocab = build_word_tokenizer("bert")
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(len(vocab), 4)).astype(np.float32)
    wv = wordvec.from_embeddings(tok, matrix)
    assert "[CLS]" not in wv.index and "." not in wv.index and "movie" in wv.index
    np.testing.assert_allclose(wv.unit("movie"), matrix[vocab["movie"]] / np.linalg.norm(matrix[vocab["movie"]]),
                               rtol=1e-6)
    assert "MOVIE" in wv  # uncased lookups
    assert "zzzz" not in wv  # the tokenizer maps it to [UNK]: out of vocabulary
    with pytest.raises(LmforgeError, match="not in the vocabulary"):
        wv.similar("zzzz")
    top = wv.similar("good", topn=3)
    assert len(top) == 3 and all(w in wv.index for w, _ in top) and "good" not in [w for w, _ in top]


def test_cased_lookup_falls_back_and_excludes_every_case_form():
    words = ["Paris", "paris", "France", "london", "x"]
    vecs = np.array([[1, 0.1], [1, 0.12], [0.9, 0.3], [0.8, 0.5], [-1, 0]], dtype=float)
    wv = wordvec.WordVectors(words, vecs)
    assert "PARIS" in wv and "berlin" not in wv and "france" in wv and "London" in wv
    assert wv.row("france") == 2 and wv.row("paris") == 1
    near = [w for w, _ in wv.similar("paris", topn=4)]
    assert "Paris" not in near and near[0] == "France"
    res = wordvec.evaluate_analogies(wordvec.WordVectors(["a", "b", "c", "D"], np.eye(4) + [1, 1, 0, 1]),
                                     [("k", "a", "b", "c", "d")])
    assert res["questions"] == 1 and res["skipped"] == 0 and res["correct"] == 1  # "D" answers "d"
