"""Read and write sentence-transformers model folders.

A folder is a Hugging Face model (``config.json``, weights, tokenizer) plus
``modules.json`` listing the pipeline -- Transformer -> Pooling (-> Normalize) -- with each
module's settings in its sub-folder (``1_Pooling/config.json``) and the transformer's in
``sentence_bert_config.json``. We write the long-standing layout every sentence-transformers
release reads (2.x to 6.x), and read both it and the 6.x layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import LmforgeError

ST_TYPES = {
    "transformer": "sentence_transformers.models.Transformer",
    "pooling": "sentence_transformers.models.Pooling",
    "normalize": "sentence_transformers.models.Normalize",
}
# legacy Pooling config key -> our pooling name (None: not supported here)
LEGACY_POOLING = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_sqrt_len_tokens": None,
    "pooling_mode_weightedmean_tokens": None,
}
NEW_POOLING = {"mean": "mean", "cls": "cls", "max": "max", "lasttoken": "last"}


@dataclass(frozen=True)
class StSettings:
    """What a folder says about how to embed with it (defaults for plain HF folders)."""

    transformer_path: str = ""
    pooling: str | None = None
    normalize: bool = False
    max_seq_length: int | None = None
    is_sentence_transformers: bool = False


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LmforgeError(f"{path}: unreadable sentence-transformers file ({type(exc).__name__})") from None


def _pooling_mode(cfg: dict, where: Path) -> str:
    if "pooling_mode" in cfg:  # sentence-transformers 6.x
        modes = cfg["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
        if len(modes) != 1 or modes[0] not in NEW_POOLING:
            raise LmforgeError(f"{where}: pooling {modes} is not supported (use one of mean, cls, max, lasttoken)")
        return NEW_POOLING[modes[0]]
    on = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    if len(on) != 1 or LEGACY_POOLING.get(on[0]) is None:
        raise LmforgeError(f"{where}: pooling {on or 'none'} is not supported (use one of mean, cls, max, lasttoken)")
    return LEGACY_POOLING[on[0]]


def read_st_settings(folder: str | Path) -> StSettings:
    """Pooling, normalisation and max length of a sentence-transformers folder.

    A folder without ``modules.json`` is a plain Hugging Face model: the defaults are returned.
    Modules lmforge cannot reproduce (Dense, weighted-mean pooling ...) are a clear error.
    """
    folder = Path(folder)
    mfile = folder / "modules.json"
    if not mfile.is_file():
        return StSettings()
    modules = _read_json(mfile)
    path, pooling, normalize, max_len = "", None, False, None
    for m in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        sub = folder / m.get("path", "")
        if kind == "Transformer":
            path = m.get("path", "")
            cfg_file = sub / "sentence_bert_config.json"
            if cfg_file.is_file():
                max_len = _read_json(cfg_file).get("max_seq_length")
        elif kind == "Pooling":
            pooling = _pooling_mode(_read_json(sub / "config.json"), sub / "config.json")
        elif kind == "Normalize":
            normalize = True
        else:
            raise LmforgeError(f"{mfile}: module type '{m.get('type')}' is not supported by lmforge "
                               "(supported: Transformer, Pooling, Normalize)")
    return StSettings(path, pooling, normalize, int(max_len) if max_len else None, True)


def save_st_folder(encoder, out_dir: str | Path) -> Path:
    """Write ``encoder`` as a sentence-transformers folder; ``SentenceTransformer(out_dir)`` loads it.

    Layout: HF ``config.json`` + ``model.safetensors`` + tokenizer files at the root,
    ``modules.json``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``,
    ``1_Pooling/config.json`` and (when normalising) ``2_Normalize/``. Replaces ``out_dir`` atomically.
    """
    import torch
    import transformers

    from ..rundir import atomic_dir

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        encoder.backbone.save_pretrained(tmp, safe_serialization=True)
        encoder.tokenizer.save_pretrained(tmp)
        modules = [{"idx": 0, "name": "0", "path": "", "type": ST_TYPES["transformer"]},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_TYPES["pooling"]}]
        if encoder.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_TYPES["normalize"]})
            (tmp / "2_Normalize").mkdir()
        pool_cfg = {"word_embedding_dimension": encoder.dim}
        pool_cfg |= {k: LEGACY_POOLING[k] == encoder.pooling for k in LEGACY_POOLING}
        pool_cfg["include_prompt"] = True
        (tmp / "1_Pooling").mkdir()
        _write(tmp / "1_Pooling" / "config.json", pool_cfg)
        _write(tmp / "modules.json", modules)
        _write(tmp / "sentence_bert_config.json", {"max_seq_length": encoder.max_length, "do_lower_case": False})
        _write(tmp / "config_sentence_transformers.json", {
            "__version__": {"lmforge": _lmforge_version(), "transformers": transformers.__version__,
                            "pytorch": torch.__version__},
            "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    return out


def _lmforge_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmforge")
    except PackageNotFoundError:
        return "unknown"


def _write(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
