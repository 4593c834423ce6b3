"""Resolve a model reference to a local Hugging Face folder.

A reference is one of:
- a packaged alias (``minilm``, ``smollm2``, optional ``mpnet``), located without importing its
  package; ``mpnet`` ships as a zip split over five distributions (``make models-extra``), joined and
  extracted once into ``cache_dir()/packaged/<zip name>-<key>/``;
- a local Hugging Face folder;
- a ``.gguf`` file (or a folder holding exactly one), dequantised once into a cache folder;
- a hub id, downloaded with ``huggingface_hub`` when online (a clear one-line error offline).
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from pathlib import Path

from ..errors import LmforgeError

log = logging.getLogger(__name__)

from .packaged import (PACKAGED, Packaged, SplitZip, cache_dir, check_gguf, check_writable,  # noqa: E402,F401
                       dequantise_gguf, extract_split_zip, package_path, packaged_path)


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not ref.startswith((".", "~"))


def resolve_model(ref: str, revision: str | None = None) -> Path:
    """Turn a model reference into a local folder holding config.json (and weights).

    The folder is checked before anything loads it (:func:`check_model_folder`): a malformed
    ``config.json``, an unknown ``model_type``, missing, truncated or pickled weights are one line.
    """
    return check_model_folder(_resolve(ref, revision))


def _resolve(ref: str, revision: str | None) -> Path:
    from ..config import preview

    if not isinstance(ref, str) or not ref or len(ref) > 4096 or "\0" in ref:
        raise LmforgeError(f"model {preview(ref, 240)} not found (packaged aliases: {', '.join(PACKAGED)})")
    if ref in PACKAGED:
        p = PACKAGED[ref].locate(ref)
        return dequantise_gguf(p) if p.suffix == ".gguf" else p
    p = Path(os.path.expanduser(ref))
    try:
        is_file, is_dir = p.is_file(), p.is_dir()
    except OSError:  # a name too long for the file system ...
        is_file = is_dir = False
    if is_file and p.suffix == ".gguf":
        return dequantise_gguf(p)
    if is_dir:
        if (p / "config.json").is_file():
            return p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return dequantise_gguf(ggufs[0])
        raise LmforgeError(f"{p}: not a Hugging Face model folder (no config.json)")
    if p.suffix == ".gguf" or ref.startswith((".", "/", "~")) or not _looks_like_hub_id(ref):
        raise LmforgeError(f"model {preview(ref, 240)} not found (packaged aliases: {', '.join(PACKAGED)})")
    return _download(ref, revision)


# ---- checking a model folder before loading it ------------------------------------------------------------
PICKLED = ("pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
#: model types whose position ids start after the padding index (usable positions = max - pad - 1)
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "roberta-prelayernorm"}


def read_model_config(folder: str | Path) -> dict:
    """``config.json`` of a model folder as a dict; malformed JSON or a non-mapping is one line."""
    f = Path(folder) / "config.json"
    try:
        raw = f.read_bytes()
    except OSError as exc:
        raise LmforgeError(f"{f}: cannot read ({exc.strerror or exc})") from None
    try:
        cfg = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{f}: not UTF-8 text (byte {exc.start + 1})") from None
    except json.JSONDecodeError as exc:
        raise LmforgeError(f"{f}: malformed JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(cfg, dict):
        raise LmforgeError(f"{f}: must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def check_safetensors(path: Path) -> None:
    """A safetensors file's 8-byte header length, JSON header and data size agree with the file
    size (a truncated download or a garbage file is one line, not a loader traceback)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size or n > 100_000_000:
                raise LmforgeError(f"{path}: not a complete safetensors file (header of {max(n, 0)} bytes in a "
                                   f"{size}-byte file: truncated or not safetensors)")
            header = json.loads(fh.read(n).decode("utf-8"))
    except OSError as exc:
        raise LmforgeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LmforgeError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise LmforgeError(f"{path}: not a safetensors file (its header is not a JSON object)")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise LmforgeError(f"{path}: not a safetensors file (tensor {name[:60]!r} has no data offsets)")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise LmforgeError(f"{path}: truncated or padded safetensors file ({size} bytes, the header describes "
                           f"{8 + n + end}); download or save it again")


def weight_files(folder: Path) -> list[Path]:
    """A model folder's safetensors files (the index's shards when it has one; one line if one is missing)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise LmforgeError(f"{index}: malformed safetensors index (no weight_map)") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise LmforgeError(f"{folder}: shard {missing[0]} listed in model.safetensors.index.json is missing")
        return [folder / s for s in shards]
    return sorted(folder.glob("*.safetensors"))


def check_model_folder(folder: Path) -> Path:
    """Refuse, in one line, a model folder that would fail (or run pickle) deep inside transformers:
    malformed ``config.json``, unknown ``model_type`` (unless the folder ships its own code),
    no weights, pickled weights only, truncated or garbage safetensors. Returns ``folder``."""
    folder = Path(folder)
    cfg = read_model_config(folder)
    model_type = cfg.get("model_type")
    if cfg.get("auto_map"):
        from ..config import remote_code_flag

        if remote_code_flag() is False:  # a command that loads saved runs/models, without the flag
            raise LmforgeError(f"{folder}: the model ships its own Python code (auto_map in config.json); "
                               "pass --trust-remote-code to the command if you trust it")
    else:
        from transformers import CONFIG_MAPPING

        if not isinstance(model_type, str) or not model_type:
            raise LmforgeError(f"{folder / 'config.json'}: no model_type (which architecture is this?)")
        if model_type not in CONFIG_MAPPING:
            raise LmforgeError(f"{folder / 'config.json'}: unknown model_type {model_type[:60]!r} (not an "
                               "architecture of the installed transformers; upgrade transformers?)")
    weights = weight_files(folder)
    if not weights:
        pickled = sorted({p.name for pat in PICKLED for p in folder.glob(pat)})
        if pickled:
            raise LmforgeError(f"{folder}: only pickled weights ({', '.join(pickled[:3])}); lmforge never unpickles "
                               "model files: convert them to model.safetensors")
        raise LmforgeError(f"{folder}: no weights (no model.safetensors)")
    for w in weights:
        check_safetensors(w)
    return folder


def is_seq2seq_config(cfg: dict) -> bool:
    """True for encoder-decoder (seq2seq) language models (T5, FLAN-T5, BART, mBART, Pegasus ...):
    ``is_encoder_decoder`` in ``config.json`` (or, when it is unset, a model type transformers maps
    to ``AutoModelForSeq2SeqLM``). ``cfg`` is the model's ``config.json`` as a dict."""
    if "is_encoder_decoder" in cfg:
        return bool(cfg["is_encoder_decoder"])
    from transformers.models.auto import modeling_auto as auto

    return cfg.get("model_type") in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES


def is_seq2seq_folder(folder: str | Path) -> bool:
    """:func:`is_seq2seq_config` of a resolved model folder (False when it has no readable config)."""
    try:
        return is_seq2seq_config(read_model_config(folder))
    except LmforgeError:
        return False


#: tasks and commands that take an encoder-decoder model; every other generative path is causal-only
SEQ2SEQ_PATHS = "sft, rl, generate, merge, eval --task generation, classify method text2text"
#: tasks that train causal LMs only (their losses read next-token log-probs of one decoder)
CAUSAL_ONLY_TASKS = ("preference", "reward")


def seq2seq_refusal(where: str | Path, cfg: dict, purpose: str) -> LmforgeError:
    """The one-line error for an encoder-decoder model given to a causal-only ``purpose``."""
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    what = archs[0] if archs else cfg.get("model_type")
    return LmforgeError(f"{where}: {what} is an encoder-decoder (seq2seq) model; {purpose} needs a causal "
                        f"(decoder-only) LM (seq2seq models work with: {SEQ2SEQ_PATHS})")


def check_architecture(folder: str | Path, kind: str, purpose: str | None = None) -> None:
    """Refuse a model of the wrong kind for a command in one line: ``kind`` is ``"causal"``
    (chat, perplexity, ...: decoder-only), ``"generative"`` (generate, merge, generation eval:
    causal or seq2seq) or ``"masked"`` (fill-mask). ``purpose`` names the command or task in the
    message. Folders with their own code (``auto_map``) are left to their loader."""
    from transformers.models.auto import modeling_auto as auto

    cfg = read_model_config(folder)
    if cfg.get("auto_map"):
        return
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    model_type = cfg.get("model_type")
    causal_arch = any("CausalLM" in a or "LMHead" in a for a in archs)
    what = archs[0] if archs else model_type
    if kind in ("causal", "generative") and is_seq2seq_config(cfg):
        if kind == "causal":
            raise seq2seq_refusal(folder, cfg, purpose or "this command")
        return
    if kind in ("causal", "generative"):
        if model_type not in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (archs and not causal_arch):
            raise LmforgeError(f"{folder}: {what} is not a causal (decoder) language model; generate, chat, merge "
                               "and perplexity need one (fill-mask and embed take encoders)")
    elif model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES or causal_arch:
        raise LmforgeError(f"{folder}: {what} is not a masked-LM (encoder) model; fill-mask needs one "
                           "(use generate for causal LMs)")


def check_config_fits(cfg) -> None:
    """Checks of a run config against its model that must pass before a run folder is created:
    a chosen ``data.max_length`` within the model's learned positions (the default, 128, is left
    to the task's truncation: only test-size models have fewer positions)."""
    if cfg.data.max_length != type(cfg.data).model_fields["max_length"].default:
        check_max_length(resolve_model(cfg.model.name, cfg.model.revision), cfg.data.max_length)
    causal_only = cfg.task in CAUSAL_ONLY_TASKS or (cfg.task == "classify" and getattr(
        getattr(cfg, "classify", None), "method", None) == "prompt")
    if causal_only and cfg.model.name not in PACKAGED:  # the packaged models are no seq2seq models
        try:
            folder = resolve_model(cfg.model.name, cfg.model.revision)
        except LmforgeError:
            folder = None  # the task reports a model it cannot find, after checking its data
        if folder is not None and is_seq2seq_folder(folder):
            what = f"task {cfg.task}" + (" (classify.method prompt; use text2text)" if cfg.task == "classify" else "")
            raise seq2seq_refusal(f"model.name: {cfg.model.name}", read_model_config(folder), what)
    if not cfg.model.trust_remote_code:
        p = Path(os.path.expanduser(cfg.model.name))
        try:
            ships_code = (p / "config.json").is_file() and bool(read_model_config(p).get("auto_map"))
        except (OSError, LmforgeError):
            ships_code = False  # the task reports an unreadable folder itself
        if ships_code:
            raise LmforgeError(f"model.trust_remote_code: {p} ships its own Python code (auto_map in config.json); "
                               "set model.trust_remote_code=true if you trust it")


def check_max_length(folder: str | Path, max_length: int, key: str = "data.max_length") -> None:
    """Refuse a ``max_length`` beyond the positions of the model in ``folder`` (see :func:`check_positions`)."""
    check_positions(read_model_config(folder), max_length, key, str(folder))


def check_positions(cfg: dict, max_length: int, key: str, where: str) -> None:
    """Refuse a ``max_length`` beyond the positions of a model with learned position embeddings
    (BERT, RoBERTa, GPT-2 ...: longer rows would index past the table). Rotary models (no such
    table) are not limited here. ``cfg`` is the model's ``config.json`` as a dict."""
    if any(cfg.get(k) for k in ("rope_theta", "rope_scaling", "rope_parameters")):
        return
    positions = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    if not isinstance(positions, int) or positions <= 0:
        return
    if cfg.get("model_type") in OFFSET_POSITIONS:
        positions -= int(cfg.get("pad_token_id") or 0) + 1
    if max_length > positions:
        raise LmforgeError(f"{key}: {max_length} is beyond the model's {positions} positions ({where}); "
                           f"set {key}={positions} or less")


def _preview(ref: str) -> str:
    from ..config import preview

    return preview(ref, 240)


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
            f"model {_preview(ref)} could not be fetched from the Hugging Face hub ({kind}; offline?); "
            f"use a local folder, a .gguf file or a packaged alias: {', '.join(PACKAGED)}"
        ) from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    """Load the tokenizer of a resolved folder; give decoders a pad token.

    A folder without tokenizer files is refused (transformers would build an empty vocabulary
    that maps every word to the unknown token), and unreadable files are one line."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise LmforgeError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])} ...)")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise LmforgeError(f"{folder}: cannot load the tokenizer ({first})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def is_decoder_only(config) -> bool:
    """True for causal-LM architectures (Llama, Gemma, GPT-2 ...)."""
    archs = getattr(config, "architectures", None) or []
    if any("CausalLM" in a or "LMHead" in a for a in archs):
        return True
    return bool(getattr(config, "is_decoder", False)) and not getattr(config, "is_encoder_decoder", False)
