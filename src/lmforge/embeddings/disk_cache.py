"""On-disk cache of sentence embeddings: ``encoder.encode(texts)`` computed once per model, texts
and encoding settings, stored as ``.npy`` (written atomically, loaded without pickle).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from ..rundir import write_array


def embedding_cache_path(folder: Path, texts: Sequence[str], settings: str) -> Path:
    """``cache_dir()/embeddings/<key>.npy``, key = sha256(model fingerprint, settings, texts)."""
    from ..fingerprint import model_fingerprint
    from ..models import cache_dir

    h = hashlib.sha256(model_fingerprint(folder).encode())
    h.update(f"|{settings}|{len(texts)}|".encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return cache_dir() / "embeddings" / f"{h.hexdigest()[:40]}.npy"


def cache_file(encoder, texts: Sequence[str], folder: Path, placement) -> Path:
    """Where :func:`cached_encode` keeps ``encoder.encode(texts)`` (the file may not exist yet)."""
    weights = next(encoder.parameters()).dtype
    settings = (f"{encoder.pooling}|{encoder.normalize}|{encoder.max_length}|{placement.describe()}|{weights}|"
                f"{encoder.code_path(placement)}")
    return embedding_cache_path(folder, texts, settings)


def cached_encode(encoder, texts: list[str], folder: Path, *, batch_size: int, placement) -> np.ndarray:
    """``encoder.encode(texts)``, read from / written to the on-disk cache.

    The key covers the model files, the texts (in order), pooling, normalisation, max length,
    compute precision, weight dtype and the encoder's code path (``SentenceEncoder.code_path``: the
    fast path and transformers' agree to ~1e-5, not bit for bit), so any change re-embeds; files are
    written atomically and loaded without pickle.
    """
    path = cache_file(encoder, texts, folder, placement)
    if path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape[0] == len(texts):
                return arr
        except (OSError, ValueError):
            pass  # unreadable: embed again and overwrite
    arr = encoder.encode(texts, batch_size=batch_size, placement=placement)
    write_array(path, arr)
    return arr
