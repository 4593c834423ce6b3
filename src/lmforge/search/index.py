"""The search index folder: build it, add to it, load it back (refusing anything suspicious).

Layout (everything written inside one :func:`lmforge.rundir.atomic_dir`, so a killed build leaves
the old index, or nothing, never half a folder)::

    INDEX/
      manifest.json   format, model reference + a probe vector, chunking, vector dtype, counts,
                      and the byte size of every file below (a truncated file is refused)
      docs.jsonl      {"id", "text"} per document
      chunks.jsonl    {"doc_id", "start", "end", "text"} per chunk (row i = vector row i)
      vectors.npy     (N, D) float32 | float16 | int8, L2-normalised before storage
      ranges.npy      (2, D) float32 per-dimension int8 ranges (int8 only)
      binary.npy      (N, ceil(D / 8)) uint8 sign bits (optional)
      bm25/           bm25s' index (numpy arrays + JSON, memory-mapped on load)
      faiss.index     an HNSW inner-product index (optional, faiss-cpu)

Adding documents encodes only the new chunks; the dense rows (and int8 ranges, so old codes stay
valid) are kept. BM25 statistics (document frequencies, average length) depend on the whole
corpus, so the BM25 part is re-indexed from the stored chunk texts, which costs no model pass.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LmforgeError
from ..rundir import atomic_dir, write_array, write_json, write_jsonl
from . import vectors as V
from .bm25 import build_bm25, load_bm25, save_bm25
from .chunking import Chunk, check_chunking, chunk_documents

log = logging.getLogger("lmforge")

FORMAT = 1
MANIFEST = "manifest.json"
PROBE_TEXT = "lmforge index probe: the quick brown fox jumps over the lazy dog."
PROBE_TOLERANCE = 2e-2  # max |probe difference| accepted between the index's and the query's model


@dataclass
class IndexSettings:
    """How an index is built.

    Attributes:
        chunking: ``sentences``, ``tokens``, ``paragraphs`` or ``none``.
        size: units per chunk; overlap: units shared by consecutive chunks.
        dtype: dense storage ``float32``, ``float16`` or ``int8``.
        binary: also store sign bits for a Hamming first pass (rescored with the dense vectors).
        faiss: also build an approximate FAISS HNSW index (used by search unless exact is asked).
        batch_size: encoder batch size. 16: on the packed fast path the same CPU seconds as 32 in
            fp32 and fewer in int8 (400 BoolQ passages, 1 thread, AVX-512 without BF16: fp32 8.24 vs
            8.27-8.47 CPU-s, int8 3.49-3.61 vs 3.72-3.76: its int32 products stay in cache), 32 the
            same as 64 (bf16: 7.86 vs 7.88 CPU-s at 1 thread, 8.46 vs 8.35 at 2), and smaller
            batches hold less memory (2 threads, bf16: 754 MB at 32 vs 863 at 64: two workers each
            hold a batch's activations); ``bench/search.py``.
        precision: the encoder's precision for chunks, added documents and queries alike
            (:data:`lmforge.device.PRECISIONS`; ``int8``: int8 linear layers on the CPU).
    """

    chunking: str = "sentences"
    size: int = 3
    overlap: int = 0
    dtype: str = "float32"
    binary: bool = False
    faiss: bool = False
    batch_size: int = 16
    precision: str = "auto"

    def check(self) -> None:
        from ..device import PRECISIONS

        check_chunking(self.chunking, self.size, self.overlap)
        if self.precision not in PRECISIONS:
            raise LmforgeError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        if self.dtype not in V.DTYPES:
            raise LmforgeError(f"vector dtype must be one of {', '.join(V.DTYPES)}, got '{self.dtype}'")
        if self.batch_size < 1:
            raise LmforgeError(f"batch size must be >= 1, got {self.batch_size}")


def model_folder(ref: str) -> str:
    """An embed run directory means its ``model/`` folder; anything else is a model reference."""
    from ..rundir import is_run_dir, open_run

    p = Path(ref).expanduser()
    if is_run_dir(p):
        art = open_run(p).artefact
        if art is not None and (art / "modules.json").is_file():
            return str(art)
    return str(ref)


def load_encoder(ref: str, placement=None, precision: str = "auto"):
    """A :class:`SentenceEncoder` for ``ref``, ready for inference on ``placement`` (default: the
    default device at ``precision``)."""
    from ..device import Placement
    from ..embeddings import SentenceEncoder

    place = placement or Placement.resolve("auto", precision)
    enc = SentenceEncoder.from_pretrained(model_folder(ref))
    return enc.to_inference(place), place


def embed_texts(encoder, placement, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Normalised float32 vectors of ``texts``: (N, D) (normalised in place: no second copy)."""
    if not texts:
        return np.zeros((0, encoder.dim), np.float32)
    return V.normalize_rows(encoder.encode(list(texts), batch_size=batch_size, placement=placement), inplace=True)


def read_documents(path: str, *, id_column: str | None = None, text_column: str = "text") -> list[tuple[str, str]]:
    """``(doc_id, text)`` pairs of any file lmforge reads. Ids come from ``id_column`` (default:
    ``id`` when the file has it, else the 0-based row number)."""
    from ..data import read_table
    from ..data.schema import require_columns, text_values

    table = read_table(path)
    if not table.records:
        raise LmforgeError(f"{path}: no documents (empty corpus)")
    cols = table.columns()
    if id_column is None:
        id_column = "id" if "id" in cols else None
    require_columns(table, [text_column] + ([id_column] if id_column else []))
    texts = text_values(table, text_column)
    if id_column is None:
        return [(str(i), t) for i, t in enumerate(texts)]
    ids = []
    for i, rec in enumerate(table.records):
        v = rec[id_column]
        if v is None or (isinstance(v, str) and not v.strip()):
            raise LmforgeError(f"{table.where(i)}: empty document id '{id_column}'")
        ids.append(str(v))
    return list(zip(ids, texts))


def _check_docs(docs: Sequence[tuple[str, str]], existing: set[str] = frozenset()) -> None:
    if not docs:
        raise LmforgeError("no documents: the corpus is empty")
    seen = set(existing)
    for doc_id, text in docs:
        if doc_id in seen:
            raise LmforgeError(f"document id '{doc_id}' appears twice")
        seen.add(doc_id)
        if not isinstance(text, str) or not text.strip():
            raise LmforgeError(f"document '{doc_id}' has no text")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise LmforgeError("a FAISS index needs faiss-cpu: pip install 'lmforge[search]'") from None
    return faiss


def _build_faiss(vecs: np.ndarray, old=None):
    faiss = _faiss()
    index = old if old is not None else faiss.IndexHNSWFlat(vecs.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    if old is None:
        index.hnsw.efConstruction = 80
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    return index


def _write_folder(out: Path, manifest: dict, docs: list[dict], chunks: list[dict], stored: np.ndarray,
                  ranges: np.ndarray | None, binary: np.ndarray | None, faiss_index) -> None:
    """Everything into a temporary folder, the manifest (with file sizes) last, then rename."""
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "docs.jsonl", docs)
        write_jsonl(tmp / "chunks.jsonl", chunks)
        write_array(tmp / "vectors.npy", stored)
        if ranges is not None:
            write_array(tmp / "ranges.npy", ranges)
        if binary is not None:
            write_array(tmp / "binary.npy", binary)
        save_bm25(build_bm25([c["text"] for c in chunks]), tmp / "bm25")
        if faiss_index is not None:
            _faiss().write_index(faiss_index, str(tmp / "faiss.index"))
        manifest["files"] = {str(p.relative_to(tmp)): p.stat().st_size
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / MANIFEST, manifest)


def build_index(docs: Sequence[tuple[str, str]], model: str, out: str | Path, settings: IndexSettings | None = None,
                *, encoder=None, placement=None, progress: bool = False) -> dict:
    """Chunk, embed and index ``docs`` into the folder ``out`` (replaced atomically).

    Args:
        docs: ``(doc_id, text)`` pairs; ids unique, texts non-empty.
        model: the encoder reference recorded in the manifest (alias, folder or embed run).
        out: the index folder.
        settings: chunking and storage (:class:`IndexSettings`).
        encoder, placement: an already loaded encoder for ``model`` (else it is loaded).

    Returns:
        A summary: documents, chunks, dim, seconds, chunks_per_s.
    """
    s = settings or IndexSettings()
    s.check()
    docs = [(str(i), t) for i, t in docs]
    _check_docs(docs)
    if encoder is None:
        encoder, placement = load_encoder(model, placement, s.precision)
    t0 = time.perf_counter()
    chunks = chunk_documents(docs, mode=s.chunking, size=s.size, overlap=s.overlap, tokenizer=encoder.tokenizer)
    if not chunks:
        raise LmforgeError("the documents produced no chunks")
    vecs = embed_texts(encoder, placement, [c.text for c in chunks], s.batch_size)
    t_embed = time.perf_counter() - t0
    ranges = V.int8_ranges(vecs) if s.dtype == "int8" else None
    manifest = {"format": FORMAT, "model": str(model), "dim": int(vecs.shape[1]),
                "probe": _probe(encoder, placement), "settings": asdict(s),
                "n_docs": len(docs), "n_chunks": len(chunks), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_folder(Path(out), manifest, [{"id": i, "text": t} for i, t in docs], [c.to_json() for c in chunks],
                  V.store_vectors(vecs, s.dtype, ranges), ranges, V.pack_binary(vecs) if s.binary else None,
                  _build_faiss(vecs) if s.faiss else None)
    dt = time.perf_counter() - t0
    return {"index": str(out), "documents": len(docs), "chunks": len(chunks), "dim": int(vecs.shape[1]),
            "dtype": s.dtype, "seconds": round(dt, 3), "chunks_per_s": round(len(chunks) / max(t_embed, 1e-9), 1)}


def _probe(encoder, placement) -> list[float]:
    return [round(float(x), 6) for x in embed_texts(encoder, placement, [PROBE_TEXT])[0]]


class SearchIndex:
    """A loaded index (see the module docstring); vectors and BM25 arrays are memory-mapped."""

    def __init__(self, folder: Path, manifest: dict, docs: list[dict], chunks: list[dict], stored: np.ndarray,
                 ranges: np.ndarray | None, binary: np.ndarray | None):
        self.folder, self.manifest = folder, manifest
        self.docs, self.chunks = docs, chunks
        self.stored, self.ranges, self.binary = stored, ranges, binary
        self.settings = IndexSettings(**manifest["settings"])
        self._bm25 = self._faiss_index = self._encoder = None
        self._last_queries: tuple | None = None
        self.placement = None
        self.doc_of = [c["doc_id"] for c in chunks]

    # ---- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path) -> "SearchIndex":
        """Open an index folder; a missing, truncated or inconsistent part is one error line."""
        folder = Path(folder)
        mpath = folder / MANIFEST
        if not folder.is_dir():
            raise LmforgeError(f"{folder}: index folder not found")
        if not mpath.is_file():
            raise LmforgeError(f"{folder}: not a search index (no {MANIFEST}; a half-written build never has one)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
            files, settings = manifest["files"], manifest["settings"]
            n_chunks, dim = int(manifest["n_chunks"]), int(manifest["dim"])
            fmt = manifest["format"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise LmforgeError(f"{mpath}: corrupted manifest ({type(exc).__name__}: {exc})") from None
        if fmt != FORMAT:
            raise LmforgeError(f"{mpath}: index format {fmt} is not supported (expected {FORMAT})")
        if not isinstance(settings, dict):
            raise LmforgeError(f"{mpath}: corrupted manifest ('settings' is not an object)")
        known = {f.name for f in fields(IndexSettings)}
        unknown = sorted(k for k in settings if k not in known)
        if unknown:
            raise LmforgeError(f"{mpath}: unknown index setting '{unknown[0]}' (known: {', '.join(sorted(known))})")
        for name, size in files.items():
            p = folder / name
            if not p.is_file() or p.stat().st_size != size:
                raise LmforgeError(f"{p}: missing or truncated (the manifest records {size} bytes); rebuild the index")
        docs = _read_jsonl(folder / "docs.jsonl")
        chunks = _read_jsonl(folder / "chunks.jsonl")
        stored = _load_npy(folder / "vectors.npy")
        ranges = _load_npy(folder / "ranges.npy", mmap=False) if settings.get("dtype") == "int8" else None
        binary = _load_npy(folder / "binary.npy") if settings.get("binary") else None
        if len(chunks) != n_chunks or stored.shape != (n_chunks, dim) or (
                binary is not None and binary.shape[0] != n_chunks):
            raise LmforgeError(f"{folder}: chunks, vectors and manifest disagree "
                               f"({len(chunks)} chunks, vectors {stored.shape}, manifest {n_chunks} x {dim})")
        return cls(folder, manifest, docs, chunks, stored, ranges, binary)

    @property
    def bm25(self):
        if self._bm25 is None:
            self._bm25 = load_bm25(self.folder / "bm25", mmap=True)
        return self._bm25

    @property
    def faiss_index(self):
        if self._faiss_index is None and self.settings.faiss:
            self._faiss_index = _faiss().read_index(str(self.folder / "faiss.index"))
        return self._faiss_index

    # ---- the model ---------------------------------------------------------------------------
    def encoder(self, model: str | None = None, placement=None):
        """The query encoder: the manifest's model, or ``model`` when its vectors match the index's
        (a probe sentence must embed to the stored probe vector; another model is refused)."""
        if self._encoder is None:
            ref = model or self.manifest["model"]
            enc, place = load_encoder(ref, placement, self.settings.precision)
            if enc.dim != int(self.manifest["dim"]):
                raise LmforgeError(f"{self.folder}: built with {self.manifest['model']} ({self.manifest['dim']}-dim); "
                                   f"{ref} gives {enc.dim}-dim vectors")
            diff = float(np.max(np.abs(np.asarray(self.manifest["probe"]) - np.asarray(_probe(enc, place)))))
            if diff > PROBE_TOLERANCE:
                raise LmforgeError(f"{self.folder}: built with model '{self.manifest['model']}'; '{ref}' embeds "
                                   f"differently (probe differs by {diff:.3f}); rebuild the index for that model")
            self._encoder, self.placement = enc, place
        return self._encoder

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        """(Q, D) normalised query vectors; the last call's are reused (hybrid after dense, eval per mode)."""
        key = tuple(queries)
        if getattr(self, "_last_queries", None) is not None and self._last_queries[0] == key:
            return self._last_queries[1]
        vecs = embed_texts(self.encoder(), self.placement, queries, self.settings.batch_size)
        self._last_queries = (key, vecs)
        return vecs

    # ---- adding ------------------------------------------------------------------------------
    def add(self, docs: Sequence[tuple[str, str]], *, model: str | None = None) -> dict:
        """Add documents without re-embedding the existing chunks; the folder is replaced atomically."""
        docs = [(str(i), t) for i, t in docs]
        _check_docs(docs, {d["id"] for d in self.docs})
        enc = self.encoder(model)
        s = self.settings
        t0 = time.perf_counter()
        new = chunk_documents(docs, mode=s.chunking, size=s.size, overlap=s.overlap, tokenizer=enc.tokenizer)
        if not new:
            raise LmforgeError("the new documents produced no chunks")
        vecs = embed_texts(enc, self.placement, [c.text for c in new], s.batch_size)
        stored = np.concatenate([np.asarray(self.stored), V.store_vectors(vecs, s.dtype, self.ranges)])
        binary = np.concatenate([np.asarray(self.binary), V.pack_binary(vecs)]) if s.binary else None
        fa = _build_faiss(vecs, self.faiss_index) if s.faiss else None
        chunks = self.chunks + [c.to_json() for c in new]
        all_docs = self.docs + [{"id": i, "text": t} for i, t in docs]
        manifest = dict(self.manifest, n_docs=len(all_docs), n_chunks=len(chunks),
                        updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        _write_folder(self.folder, manifest, all_docs, chunks, stored, self.ranges, binary, fa)
        return {"index": str(self.folder), "added_documents": len(docs), "added_chunks": len(new),
                "documents": len(all_docs), "chunks": len(chunks), "seconds": round(time.perf_counter() - t0, 3)}


def _read_jsonl(path: Path) -> list[dict]:
    out, n = [], 0
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                out.append(json.loads(line))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"{path} line {n}: corrupted ({type(exc).__name__})") from None
    return out


def _load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LmforgeError(f"{path}: corrupted array ({str(exc).splitlines()[0]})") from None


def chunk_of(index: SearchIndex, row: int) -> Chunk:
    c = index.chunks[row]
    return Chunk(c["doc_id"], c["start"], c["end"], c["text"])
