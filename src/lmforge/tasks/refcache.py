"""A disk cache of reference-model log-probabilities for preference tuning.

DPO-style losses need ``log ref(y|x)`` for every chosen and rejected completion. The reference
never changes during training, so its log-probs can be computed once (one forward pass over
the data, no gradients) and reused by every epoch and by later runs on the same data.

The cache key is a SHA-256 over
- the model: :func:`lmforge.fingerprint.model_fingerprint`, every byte of its config and weight
  files (a sample of the bytes could miss a change confined to a few layers, e.g. a merged
  adapter, and silently reuse a stale reference);
- the tokenizer: its files in the folder (vocabulary, special tokens, chat template);
- the data: every token id and target of every item, in order;
- how the reference runs: quantisation (a 4-bit base gives other log-probs) and compute dtype.

Entries are ``<cache_dir>/refcache/<key>.safetensors`` with tensors ``chosen`` and
``rejected`` of shape (N,), written atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..fingerprint import content_digest, model_fingerprint  # noqa: F401  (the package's one fingerprint)
from ..models import cache_dir

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json")


def _file_digest(path: Path, h) -> None:
    """Feed a file's name, size and content digest."""
    h.update(f"{path.name}:{path.stat().st_size}:{content_digest(path)}".encode())


def tokenizer_fingerprint(tokenizer, folder: str | Path | None = None) -> str:
    """Digest of the tokenizer files (or, without a folder, its vocabulary and template)."""
    h = hashlib.sha256()
    found = False
    if folder is not None:
        for name in _TOKENIZER_FILES:
            p = Path(folder) / name
            if p.is_file():
                _file_digest(p, h)
                found = True
    if not found:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(str(getattr(tokenizer, "eos_token_id", None)).encode())
    return h.hexdigest()


def data_fingerprint(items: Sequence[dict], keys: Sequence[str]) -> str:
    """Digest of the listed token-id fields of every item, in order."""
    h = hashlib.sha256()
    h.update(str(len(items)).encode())
    for it in items:
        for k in keys:
            arr = np.asarray(it[k], dtype=np.int64)
            h.update(len(arr).to_bytes(8, "little"))
            h.update(arr.tobytes())
    return h.hexdigest()


def reference_key(model_fp: str, tokenizer_fp: str, data_fp: str, **how) -> str:
    """The cache key: model, tokenizer and data digests plus how the reference runs."""
    h = hashlib.sha256()
    for part in (model_fp, tokenizer_fp, data_fp, json.dumps(how, sort_keys=True, default=str)):
        h.update(part.encode())
        h.update(b"|")
    return h.hexdigest()[:32]


def cache_path(key: str) -> Path:
    return cache_dir() / "refcache" / f"{key}.safetensors"


def load_reference(key: str, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cached ``(chosen (N,), rejected (N,))`` log-probs, or None (missing, unreadable or wrong size)."""
    from safetensors.torch import load_file

    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
    except Exception as exc:  # a damaged entry is recomputed, never trusted
        log.warning("ignoring unreadable reference cache %s (%s)", path, exc)
        return None
    if t.get("chosen") is None or t["chosen"].shape != (n,) or t.get("rejected") is None or t["rejected"].shape != (n,):
        return None
    return t["chosen"], t["rejected"]


def save_reference(key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> Path:
    """Write an entry atomically (:func:`lmforge.rundir.write_safetensors`)."""
    from ..rundir import write_safetensors

    path = cache_path(key)
    write_safetensors(path, {"chosen": chosen.detach().float().cpu(), "rejected": rejected.detach().float().cpu()})
    return path
