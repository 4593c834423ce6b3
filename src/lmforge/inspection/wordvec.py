"""Static word vectors: word2vec through gensim, pickle-free files, neighbours and analogies.

A :class:`WordVectors` table is a vocabulary and a matrix ``E`` (N, D). Queries use cosine
similarity on unit rows ``ê = e / ‖e‖``:

- neighbours of ``w``: ``argmax_x ê_x · ê_w`` over ``x ≠ w``;
- analogy ``a : b :: c : ?`` (3CosAdd, Mikolov et al. 2013):
  ``argmax_x ê_x · q̂`` with ``q = ê_b - ê_a + ê_c``, over ``x ∉ {a, b, c}``

(the same scores as gensim's ``most_similar(positive=[b, c], negative=[a])``). The same table can be
built from a contextual model's input embedding matrix (:func:`from_model`): its candidates are
the tokens that are whole words (WordPiece pieces without ``##``, byte-level BPE pieces with a
leading space, SentencePiece pieces with ``▁``), and a query word the tokenizer splits into several
pieces is the mean of their embeddings.

Files are the word2vec formats (``.bin`` binary, else text): a ``"N D"`` header, then per word the
word, a space and D little-endian float32 (binary) or decimal numbers (text). gensim reads and
writes them (``KeyedVectors.load_word2vec_format``); nothing is pickled.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import LmforgeError

WORD = re.compile(r"\w+(?:'\w+)?")


def words_of(text: str, lower: bool = True) -> list[str]:
    """The word tokens of a line (letters/digits with inner apostrophes), lower-cased by default."""
    return WORD.findall(text.lower() if lower else text)


@dataclass
class WordVectors:
    """A vocabulary and its vectors; lookups raise a one-line error for unknown words."""

    words: list[str]
    vectors: np.ndarray                  # (N, D) float32
    lower: bool = False                  # look words up lower-cased (uncased models)
    candidates: np.ndarray | None = None  # (N,) bool: rows that may be answers (None: all)
    compose: object = None               # word -> (D,) vector for words outside ``words`` (or None)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.words):
            raise LmforgeError(f"word vectors: {len(self.words)} words but a matrix of shape {self.vectors.shape}")
        self.index = {}
        for i, w in enumerate(self.words):
            self.index.setdefault(w, i)
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)  # (N, 1)
        self._unit = self.vectors / np.maximum(norms, 1e-12)  # (N, D)

    def __contains__(self, word: str) -> bool:
        return self.row(word) is not None or (self.compose is not None and self.compose(word) is not None)

    def _key(self, word: str) -> str:
        return word.lower() if self.lower else word

    def row(self, word: str) -> int | None:
        """The row of ``word``: as written (lower-cased for uncased tables), else its lower-cased or
        capitalised form (``paris`` finds ``Paris`` in a cased vocabulary); None when absent."""
        if self.lower:
            return self.index.get(word.lower())
        for form in (word, word.lower(), word.capitalize()):
            if form in self.index:
                return self.index[form]
        return None

    def unit(self, word: str) -> np.ndarray:
        """``ê_w`` (D,); an out-of-vocabulary word is a one-line error."""
        i = self.row(word)
        if i is not None:
            return self._unit[i]
        v = self.compose(word) if self.compose is not None else None
        if v is None:
            raise LmforgeError(f"'{word}' is not in the vocabulary ({len(self.words)} words)")
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def nearest(self, query: np.ndarray, exclude: Iterable[str] = (), topn: int = 10) -> list[tuple[str, float]]:
        """The ``topn`` candidate words closest (cosine) to ``query`` (D,), minus ``exclude``."""
        q = query / max(float(np.linalg.norm(query)), 1e-12)
        scores = self._unit @ q  # (N,)
        if self.candidates is not None:
            scores = np.where(self.candidates, scores, -np.inf)
        forms = {f for w in exclude for f in (self._key(w), w.lower(), w.capitalize(), w.upper())}
        skip = {self.index[f] for f in forms if f in self.index}  # every case form of the query words
        order = np.argsort(-scores, kind="stable")
        out = []
        for i in order:
            if len(out) >= topn or not np.isfinite(scores[i]):
                break
            if i not in skip:
                out.append((self.words[i], float(scores[i])))
        return out

    def similar(self, word: str, topn: int = 10) -> list[tuple[str, float]]:
        """Nearest neighbours of ``word``."""
        return self.nearest(self.unit(word), exclude=[word], topn=topn)

    def analogy(self, a: str, b: str, c: str, topn: int = 5) -> list[tuple[str, float]]:
        """``a : b :: c : ?`` by 3CosAdd: nearest to ``ê_b - ê_a + ê_c`` excluding a, b, c."""
        q = self.unit(b) - self.unit(a) + self.unit(c)
        return self.nearest(q, exclude=[a, b, c], topn=topn)


# ---- files ---------------------------------------------------------------------------------------
def save(wv: WordVectors, path: str | Path) -> None:
    """Write ``wv`` in word2vec format (binary for ``.bin``, else text), atomically."""
    from ..rundir import atomic_file

    path = Path(path)
    n, d = wv.vectors.shape
    bad = next((w for w in wv.words if not w or any(ch.isspace() for ch in w)), None)
    if bad is not None:
        raise LmforgeError(f"word {bad!r} is empty or holds whitespace: the word2vec format cannot store it")
    vec = wv.vectors.astype("<f4")
    with atomic_file(path, "wb") as fh:
        fh.write(f"{n} {d}\n".encode())
        for w, row in zip(wv.words, vec):
            if path.suffix == ".bin":
                fh.write(w.encode("utf-8") + b" " + row.tobytes() + b"\n")
            else:
                fh.write((w + " " + " ".join(f"{x:.6g}" for x in row.tolist()) + "\n").encode("utf-8"))


def load(path: str | Path) -> WordVectors:
    """Read a word2vec file (binary or text, detected from the content) without unpickling anything."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: word-vector file not found")
    data = path.read_bytes()
    head, _, body = data.partition(b"\n")
    try:
        n, d = (int(x) for x in head.split())
    except ValueError:
        raise LmforgeError(f"{path}: not a word2vec file (first line must be 'N D')") from None
    words: list[str] = []
    vectors = np.empty((n, d), dtype=np.float32)
    binary = _looks_binary(body, d)
    pos = 0
    try:
        for i in range(n):
            if binary:
                sp = body.index(b" ", pos)
                words.append(body[pos:sp].decode("utf-8").lstrip("\n"))
                vectors[i] = np.frombuffer(body, dtype="<f4", count=d, offset=sp + 1)
                pos = sp + 1 + 4 * d
            else:
                end = body.index(b"\n", pos) if b"\n" in body[pos:] else len(body)
                parts = body[pos:end].decode("utf-8").rstrip().split(" ")
                if len(parts) != d + 1:
                    raise ValueError(f"line {i + 2} has {len(parts) - 1} numbers, expected {d}")
                words.append(parts[0])
                vectors[i] = [float(x) for x in parts[1:]]
                pos = end + 1
    except (ValueError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path}: malformed word2vec file ({exc})") from None
    return WordVectors(words, vectors)


def _looks_binary(body: bytes, d: int) -> bool:
    """Binary rows hold raw float bytes: the first row is not ``word`` + d decimal numbers."""
    first = body.split(b"\n", 1)[0]
    try:
        return len(first.decode("utf-8").split()) != d + 1
    except UnicodeDecodeError:
        return True


# ---- training ------------------------------------------------------------------------------------
def train(sentences: Sequence[list[str]], *, sg: bool = True, dim: int = 100, window: int = 5, negative: int = 5,
          min_count: int = 5, epochs: int = 5, sample: float = 1e-3, seed: int = 0, workers: int = 1) -> WordVectors:
    """word2vec (skip-gram when ``sg``, else CBOW) with negative sampling, trained by gensim.

    ``sample`` down-samples words more frequent than that share of the corpus (0 = off; a toy corpus,
    where every word is frequent, needs 0). ``workers=1`` with a fixed seed gives the same vectors on
    every run.
    """
    try:
        from gensim.models import Word2Vec
    except ImportError:
        raise LmforgeError("word2vec training needs gensim: pip install 'lmforge[inspect]'") from None
    if not sentences or not any(sentences):
        raise LmforgeError("the corpus has no words")
    counts = Counter(w for s in sentences for w in s)
    if max(counts.values()) < min_count:
        raise LmforgeError(f"no word occurs at least min_count={min_count} times in the corpus "
                           f"({sum(counts.values())} words); lower --min-count")
    model = Word2Vec(sentences=list(sentences), vector_size=dim, window=window, min_count=min_count,
                     sg=int(sg), hs=0, negative=negative, epochs=epochs, sample=sample, seed=seed, workers=workers)
    return WordVectors(list(model.wv.index_to_key), model.wv.vectors.copy())


# ---- a contextual model's input embeddings -------------------------------------------------------
def whole_word(piece: str) -> str | None:
    """The word a vocabulary piece stands for when it starts a word, else None."""
    if piece.startswith(("Ġ", "▁")):
        w = piece[1:]
    elif piece.startswith("##") or (piece.startswith(("[", "<")) and piece.endswith(("]", ">"))):
        return None
    else:
        w = piece
    return w if w.isalpha() else None


def from_embeddings(tokenizer, matrix: np.ndarray) -> WordVectors:
    """A word table from an input embedding matrix (V, D) and its tokenizer (see module doc)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), matrix.shape[0]))))
    byte_level = sum(p.startswith("Ġ") for p in pieces) > len(pieces) // 10
    words, rows = [], []
    for i, p in enumerate(pieces):
        w = whole_word(p)
        if w is not None and (not byte_level or p.startswith("Ġ")):
            words.append(w)
            rows.append(i)
    lower = bool(getattr(tokenizer, "do_lower_case", False)) or all(w == w.lower() for w in words[:2000])
    prefix = " " if byte_level or any(p.startswith("▁") for p in pieces[:2000]) else ""

    def compose(word: str):
        ids = tokenizer(prefix + (word.lower() if lower else word), add_special_tokens=False)["input_ids"]
        if not ids or tokenizer.unk_token_id in ids:
            return None
        return matrix[ids].mean(axis=0)  # (D,)

    return WordVectors(words, matrix[rows], lower=lower, compose=compose)


def from_model(ref: str) -> WordVectors:
    """The input embeddings of any model lmforge resolves (alias, folder, hub id) as a word table."""
    import torch
    from transformers import AutoModel

    from ..models import load_tokenizer, resolve_model

    folder = resolve_model(ref)
    tokenizer = load_tokenizer(folder)
    try:
        model = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise LmforgeError(f"{ref}: cannot load the model ({str(exc).splitlines()[0]})") from None
    matrix = model.get_input_embeddings().weight.detach().float().numpy()  # (V, D)
    return from_embeddings(tokenizer, matrix)


# ---- analogy sets --------------------------------------------------------------------------------
def read_analogies(path: str | Path) -> list[tuple[str, str, str, str, str]]:
    """``(category, a, b, c, d)`` rows of a TSV ``a b c d [category]`` file (``#`` starts a comment)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path}: analogy file not found")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) not in (4, 5):
            raise LmforgeError(f"{path} line {n}: expected 'a b c d [category]', got {len(parts)} fields")
        a, b, c, d = (p.strip() for p in parts[:4])
        rows.append((parts[4].strip() if len(parts) == 5 else "all", a, b, c, d))
    if not rows:
        raise LmforgeError(f"{path}: no analogies")
    return rows


def evaluate_analogies(wv: WordVectors, rows: Sequence[tuple[str, str, str, str, str]],
                       only: Iterable[int] | None = None) -> dict:
    """Top-1 accuracy of 3CosAdd on ``rows`` (questions with an unknown word count as missed and are
    reported as ``skipped``); ``only`` restricts to those row indices."""
    keep = set(range(len(rows))) if only is None else set(only)
    per: dict[str, list[int]] = {}
    correct = total = skipped = 0
    for i, (cat, a, b, c, d) in enumerate(rows):
        if i not in keep:
            continue
        total += 1
        hit = 0
        if all(w in wv for w in (a, b, c, d)):
            got = wv.analogy(a, b, c, topn=1)
            hit = int(bool(got) and got[0][0].casefold() == d.casefold())
        else:
            skipped += 1
        correct += hit
        per.setdefault(cat, [0, 0])
        per[cat][0] += hit
        per[cat][1] += 1
    return {"accuracy": correct / max(total, 1), "correct": correct, "questions": total, "skipped": skipped,
            "per_category": {k: round(v[0] / v[1], 4) for k, v in sorted(per.items())}}
