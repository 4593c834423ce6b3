"""The fitted topic model: arrays in safetensors, everything else in JSON (no pickle anywhere).

A run's ``topics/`` folder holds::

    model.safetensors   topic_embeddings (T, D), ctfidf CSR parts, idf (V,), assignments (N,),
                        doc_embeddings (N, D), reduced (N, k), map2d (N, 2)
    topics.json         topic ids, sizes, words, keywords, labels, representative documents,
                        vocabulary, prediction threshold, settings
    documents.jsonl     the fitted documents (text, timestamp) that edits re-describe
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..errors import LmforgeError
from ..rundir import atomic_dir, write_json, write_jsonl, write_safetensors
from .represent import _unit

PREDICT_TEMPERATURE = 0.05  # softmax temperature turning cosine similarities into probabilities


@dataclass
class TopicModel:
    """Topics of one corpus. Rows of ``ctfidf`` and ``topic_embeddings`` follow ``topic_ids``
    (-1 first when there are outliers; it has a c-TF-IDF row but never wins a prediction)."""

    assignments: np.ndarray                     # (N,) int64
    topic_ids: list[int]
    vocab: list[str]
    ctfidf: sp.csr_matrix                       # (T, V)
    idf: np.ndarray                             # (V,)
    topic_embeddings: np.ndarray                # (T, D) float32, mean member embedding
    words: dict[int, list[list]] = field(default_factory=dict)      # id -> [[word, c-TF-IDF], ...]
    keywords: dict[int, list[str]] = field(default_factory=dict)    # KeyBERT-inspired / MMR words
    labels: dict[int, str] = field(default_factory=dict)
    representative: dict[int, list[int]] = field(default_factory=dict)
    threshold: float = 0.0                      # predict: cosine below it -> -1
    settings: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)     # doc_embeddings, reduced, map2d

    @property
    def sizes(self) -> dict[int, int]:
        ids, counts = np.unique(self.assignments, return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts)}

    @property
    def real_topics(self) -> list[int]:
        return [t for t in self.topic_ids if t != -1]

    def label(self, t: int) -> str:
        return self.labels.get(t) or ", ".join(self.keywords.get(t) or [w for w, _ in self.words.get(t, [])[:3]])

    # ---- prediction ------------------------------------------------------------------------------
    def predict(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest topic embedding by cosine, -1 below :attr:`threshold`.

        Args:
            embeddings: ``(M, D)`` document embeddings from the model's encoder.

        Returns:
            ``(topics (M,) int64, similarity (M,), probability (M,))`` where the probability is the
            winning entry of ``softmax(cos / 0.05)`` over the topics (outliers excluded).
        """
        emb = np.asarray(embeddings, dtype=np.float64)
        dim = self.topic_embeddings.shape[1]
        if emb.ndim != 2 or emb.shape[1] != dim:
            got = emb.shape[1] if emb.ndim == 2 else emb.shape
            raise LmforgeError(f"embedding dimension {got} does not match the topic model's {dim} "
                               f"(was it made with another encoder? model: {self.settings.get('encoder_ref', '?')})")
        rows = [r for r, t in enumerate(self.topic_ids) if t != -1]
        if not rows:
            raise LmforgeError("the topic model has no topics (every document is an outlier)")
        sims = _unit(emb) @ _unit(self.topic_embeddings[rows]).T  # (M, K)
        best = sims.argmax(axis=1)
        top = sims[np.arange(len(sims)), best]
        z = np.exp((sims - top[:, None]) / PREDICT_TEMPERATURE)
        prob = 1.0 / z.sum(axis=1)
        ids = np.asarray([self.topic_ids[r] for r in rows], dtype=np.int64)[best]
        ids = np.where(top >= self.threshold, ids, -1)
        return ids, top, prob

    def find(self, query_embedding: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` topics most similar (cosine) to a query embedding ``(D,)``."""
        q = np.asarray(query_embedding, dtype=np.float64).reshape(1, -1)
        if q.shape[1] != self.topic_embeddings.shape[1]:
            raise LmforgeError(f"query embedding dimension {q.shape[1]} does not match the topic model's "
                               f"{self.topic_embeddings.shape[1]} (another encoder?)")
        rows = [r for r, t in enumerate(self.topic_ids) if t != -1]
        s = (_unit(self.topic_embeddings[rows]) @ _unit(q)[0])
        order = np.lexsort((np.arange(len(rows)), -s))[:k]
        return [(self.topic_ids[rows[i]], float(s[i])) for i in order]

    def table(self) -> list[dict]:
        """One row per topic: id, size, top words, label."""
        sizes = self.sizes
        return [{"topic": t, "size": sizes.get(t, 0), "words": [w for w, _ in self.words.get(t, [])[:10]],
                 "label": "outliers" if t == -1 else self.label(t)} for t in self.topic_ids]

    # ---- I/O -------------------------------------------------------------------------------------
    def save(self, folder: str | Path, documents: list[dict] | None = None) -> Path:
        """Write ``folder`` (replacing it atomically): safetensors + JSON (+ documents.jsonl)."""
        import torch

        ct = sp.csr_matrix(self.ctfidf)
        tensors = {"topic_embeddings": torch.from_numpy(np.asarray(self.topic_embeddings, np.float32)),
                   "ctfidf_data": torch.from_numpy(ct.data.astype(np.float64)),
                   "ctfidf_indices": torch.from_numpy(ct.indices.astype(np.int64)),
                   "ctfidf_indptr": torch.from_numpy(ct.indptr.astype(np.int64)),
                   "idf": torch.from_numpy(np.asarray(self.idf, np.float64)),
                   "assignments": torch.from_numpy(np.asarray(self.assignments, np.int64))}
        for k, v in self.arrays.items():
            tensors[k] = torch.from_numpy(np.ascontiguousarray(v))
        meta = {"topic_ids": self.topic_ids, "shape": list(ct.shape), "vocab": self.vocab,
                "words": _keys_str(self.words), "keywords": _keys_str(self.keywords),
                "labels": _keys_str(self.labels), "representative": _keys_str(self.representative),
                "sizes": _keys_str(self.sizes), "threshold": float(self.threshold), "settings": self.settings}
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            write_safetensors(tmp / "model.safetensors", tensors)
            write_json(tmp / "topics.json", meta)
            if documents is not None:
                write_jsonl(tmp / "documents.jsonl", documents)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "TopicModel":
        """Read a folder written by :meth:`save` (safetensors + JSON only)."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / "topics.json").is_file() or not (folder / "model.safetensors").is_file():
            raise LmforgeError(f"{folder}: not a topic model (needs topics.json and model.safetensors)")
        try:
            meta = json.loads((folder / "topics.json").read_text(encoding="utf-8"))
            t = load_file(str(folder / "model.safetensors"))
        except (ValueError, OSError) as exc:
            raise LmforgeError(f"{folder}: unreadable topic model ({exc})") from None
        ct = sp.csr_matrix((t.pop("ctfidf_data"), t.pop("ctfidf_indices"), t.pop("ctfidf_indptr")),
                           shape=tuple(meta["shape"]))
        return cls(assignments=t.pop("assignments"), topic_ids=[int(x) for x in meta["topic_ids"]],
                   vocab=meta["vocab"], ctfidf=ct, idf=t.pop("idf"), topic_embeddings=t.pop("topic_embeddings"),
                   words=_keys_int(meta["words"]), keywords=_keys_int(meta["keywords"]),
                   labels=_keys_int(meta["labels"]), representative=_keys_int(meta["representative"]),
                   threshold=float(meta["threshold"]), settings=meta["settings"], arrays=t)


def read_documents(folder: str | Path) -> list[dict]:
    """The fitted documents saved next to a topic model."""
    path = Path(folder) / "documents.jsonl"
    if not path.is_file():
        raise LmforgeError(f"{folder}: the topic model has no documents.jsonl")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _keys_str(d: dict) -> dict:
    return {str(k): v for k, v in d.items()}


def _keys_int(d: dict) -> dict:
    return {int(k): v for k, v in d.items()}
