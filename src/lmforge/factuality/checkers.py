"""Claim checkers: does a reference text support a claim?

Two kinds, one interface ``checker.support(pairs) -> (N,) probabilities in [0, 1]`` where each
pair is ``(premise, hypothesis)`` = ``(reference, claim)``:

* :class:`NLIChecker` -- a cross-encoder (:class:`lmforge.embeddings.cross_encoder.CrossEncoder`,
  one logit) trained by :func:`train_nli_checker` on SNLI pairs with the shared engine
  (target 1 for ``entailment``, 0 for ``neutral``/``contradiction``): ``p = sigmoid(z)``.
* :class:`LexicalChecker` (``lexical``) -- no model: the share of the claim's content words
  found in the reference, ``p = |W(c) & W(r)| / |W(c)|``; supported when ``p >= 0.6``.
* :class:`EmbeddingChecker` -- the cheap alternative: cosine similarity of sentence embeddings,
  mapped to ``p = (cos + 1) / 2``; a claim is supported when ``cos >= threshold``.

A checker folder holds ``model/`` and ``checker.json`` (``{"kind": "nli", ...}``); anything
else handed to :func:`load_checker` (another task's run, a plain model) is refused in one line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LmforgeError

CHECKER_FILE = "checker.json"
NLI_LABELS = ("entailment", "neutral", "contradiction")


class NLIChecker:
    """Entailment probability of ``(premise, hypothesis)`` from an NLI cross-encoder.

    A claim counts as supported when ``p >= threshold`` (default 0.5)."""

    kind = "nli"

    def __init__(self, model, *, threshold: float = 0.5, batch_size: int = 64):
        self.model, self.threshold, self.batch_size = model, float(threshold), int(batch_size)

    def support(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """``(N,)`` entailment probabilities of ``(premise, hypothesis)`` pairs."""
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        return self.model.predict(list(pairs), batch_size=self.batch_size)


class LexicalChecker:
    """Content-word coverage of the hypothesis by the premise (normalised, stop words removed):
    ``p = |W(h) & W(p)| / |W(h)|`` (1 for a hypothesis without content words)."""

    kind = "lexical"

    def __init__(self, *, threshold: float = 0.6):
        self.threshold = float(threshold)

    def support(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        from .scoring import content_words

        out = []
        for prem, hyp in pairs:
            h = content_words(hyp)
            out.append(len(h & content_words(prem)) / len(h) if h else 1.0)
        return np.asarray(out, dtype=np.float64)


class EmbeddingChecker:
    """Cosine similarity of sentence embeddings as a support score.

    ``p = (cos(e_premise, e_hypothesis) + 1) / 2``; supported when ``cos >= threshold``, i.e.
    ``p >= (threshold + 1) / 2``."""

    kind = "embedding"

    def __init__(self, encoder, placement=None, *, threshold: float = 0.7, batch_size: int = 64):
        self.encoder, self.placement, self.batch_size = encoder, placement, int(batch_size)
        self.cos_threshold = float(threshold)
        self.threshold = (self.cos_threshold + 1.0) / 2.0

    def support(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        texts = sorted({t for p in pairs for t in p})
        index = {t: i for i, t in enumerate(texts)}
        vecs = np.asarray(self.encoder.encode(texts, batch_size=self.batch_size, placement=self.placement),
                          dtype=np.float32)  # (U, D)
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        a = vecs[[index[p[0]] for p in pairs]]  # (N, D)
        b = vecs[[index[p[1]] for p in pairs]]
        return ((a * b).sum(1) + 1.0) / 2.0


def read_nli(path: str | Path, limit: int | None = None, seed: int = 0) -> tuple[list[tuple[str, str]], list[str]]:
    """``(pairs, labels)`` of an SNLI-style JSONL (premise, hypothesis, label); rows whose label
    is not one of entailment/neutral/contradiction (SNLI's ``-``) are skipped. With ``limit``, a
    seeded sample of that many rows."""
    from ..data.readers import read_table

    table = read_table(str(path))
    for col in ("premise", "hypothesis", "label"):
        if table.records and col not in table.records[0]:
            raise LmforgeError(f"{path}: missing '{col}' column (an NLI file has premise, hypothesis, label)")
    rows = [(str(r["premise"]), str(r["hypothesis"]), str(r["label"])) for r in table.records
            if str(r.get("label")) in NLI_LABELS and str(r.get("premise", "")).strip() and str(r.get("hypothesis", "")).strip()]
    if not rows:
        raise LmforgeError(f"{path}: no labelled NLI pairs")
    if limit is not None and limit < len(rows):
        idx = np.random.default_rng(seed).permutation(len(rows))[:limit]
        rows = [rows[i] for i in sorted(idx)]
    return [(p, h) for p, h, _ in rows], [y for _, _, y in rows]


def entailment_accuracy(probs: np.ndarray, labels: Sequence[str], threshold: float = 0.5) -> float:
    """Binary accuracy of ``p >= threshold`` against ``label == "entailment"``."""
    gold = np.array([y == "entailment" for y in labels])
    return float(((np.asarray(probs) >= threshold) == gold).mean())


def train_nli_checker(train: str | Path, out: str | Path, *, base: str = "minilm", eval_file: str | Path | None = None,
                      max_train: int | None = None, max_eval: int | None = None, epochs: float = 1.0,
                      batch_size: int = 32, lr: float = 3e-5, max_length: int = 128, seed: int = 42,
                      device: str = "auto", precision: str = "auto") -> dict:
    """Train an NLI cross-encoder checker on SNLI-style pairs and write it to ``out`` atomically.

    The cross-encoder (lmforge's augsbert machinery: :func:`lmforge.tasks.cross_encoder.train_cross_encoder`)
    regresses ``y = 1[label == entailment]`` with binary cross-entropy. ``out`` gets ``model/``,
    ``metrics.jsonl`` and ``checker.json`` with the binary entailment accuracy on ``eval_file``.
    """
    from ..api import config
    from ..device import Placement
    from ..embeddings.cross_encoder import CrossEncoder
    from ..rundir import atomic_dir, write_json
    from ..tasks.cross_encoder import train_cross_encoder

    pairs, labels = read_nli(train, max_train, seed)
    ev = read_nli(eval_file, max_eval, seed) if eval_file else None
    cfg = config({"task": "augsbert", "name": Path(out).name, "seed": seed,
                  "model": {"name": base, "device": device, "precision": precision},
                  "data": {"train": str(train), "max_length": max_length},
                  "train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "warmup_ratio": 0.1,
                            "log_every": 20, "progress": False}})
    place = Placement.resolve(device, precision)
    ce = CrossEncoder.from_pretrained(base, max_length=max_length)
    with atomic_dir(Path(out)) as tmp:
        train_cross_encoder(ce, pairs, [1.0 if y == "entailment" else 0.0 for y in labels], cfg, tmp, placement=place)
        info = {"kind": "nli", "base": base, "train": str(train), "train_pairs": len(pairs),
                "target": "entailment vs neutral/contradiction", "threshold": 0.5}
        if ev is not None:
            probs = ce.predict(ev[0], placement=place)
            info |= {"eval": str(eval_file), "eval_pairs": len(ev[0]),
                     "accuracy": round(entailment_accuracy(probs, ev[1]), 4),
                     "majority_baseline": round(float(np.mean([y != "entailment" for y in ev[1]])), 4)}
        write_json(tmp / CHECKER_FILE, info)
        for stray in ("eval.json",):
            if (tmp / stray).exists():
                (tmp / stray).unlink()
    return info


def _wrong_kind(path: Path) -> str:
    from ..rundir import is_run_dir, read_config

    if is_run_dir(path):
        task = read_config(path).task
        extra = " (its cross_encoder/ scores similarity, not entailment)" if task == "augsbert" else ""
        return f"{path}: a '{task}' run is not a factuality checker{extra}; train one with `lmforge factuality checker`"
    return (f"{path}: not a factuality checker (no {CHECKER_FILE}); use a folder written by "
            f"`lmforge factuality checker`, lexical or embedding:MODEL")


def load_checker(ref: str, *, threshold: float | None = None, device: str = "auto", precision: str = "auto"):
    """A checker from ``ref``: a folder written by :func:`train_nli_checker`, ``lexical``, or
    ``embedding:MODEL`` (any sentence encoder lmforge loads, e.g. ``embedding:minilm``)."""
    from ..device import Placement

    if ref == "lexical":
        return LexicalChecker(threshold=0.6 if threshold is None else threshold)
    place = Placement.resolve(device, precision)
    if ref.startswith("embedding:"):
        from ..embeddings.files import load_encoder

        enc = load_encoder(ref.split(":", 1)[1])
        enc.to_inference(place)
        return EmbeddingChecker(enc, place, threshold=0.7 if threshold is None else threshold)
    path = Path(ref)
    if not path.is_dir():
        raise LmforgeError(f"{ref}: no such checker folder (or use embedding:MODEL)")
    if not (path / CHECKER_FILE).is_file():
        raise LmforgeError(_wrong_kind(path))
    try:
        info = json.loads((path / CHECKER_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path / CHECKER_FILE}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("kind") != "nli":
        raise LmforgeError(f"{path / CHECKER_FILE}: kind must be 'nli', got {info.get('kind') if isinstance(info, dict) else info!r}")
    if not (path / "model" / "config.json").is_file():
        raise LmforgeError(f"{path}: checker has no model/ folder")
    from ..embeddings.cross_encoder import CrossEncoder

    ce = CrossEncoder.from_pretrained(path / "model")
    ce.to(place.device)
    return NLIChecker(ce, threshold=float(info.get("threshold", 0.5)) if threshold is None else threshold)
