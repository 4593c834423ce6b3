"""Files around sentence embeddings: texts in (one per line or a table column), vectors out
(.npy / .parquet), and the encoder of a run directory or model reference."""
from __future__ import annotations

from pathlib import Path

from ..errors import LmforgeError


def read_texts(path: str, column: str = "text") -> list[str]:
    """Texts of a file, one per output row: a .txt line each (an empty line is an error, so rows
    stay aligned with lines) or the ``column`` of a table file."""
    from ..data import read_table
    from ..data.readers import resolve_data_path
    from ..data.schema import require_columns, text_values

    p = Path(resolve_data_path(path)).expanduser()
    if p.suffix.lower() in (".txt", ".text") and p.is_file():
        from ..config import read_text_utf8

        texts = []
        lines = read_text_utf8(p, "text file").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline
        for n, line in enumerate(lines, start=1):
            line = line.rstrip("\r")
            if not line.strip():
                raise LmforgeError(f"{path} line {n}: empty line (one text per line expected)")
            texts.append(line)
        if not texts:
            raise LmforgeError(f"{path}: no texts")
        return texts
    table = read_table(path)
    require_columns(table, [column])
    return text_values(table, column)


def write_vectors(out: str, texts: list[str], vectors) -> None:
    """Write ``(N, D)`` float32 vectors to ``out``: ``.npy`` (the matrix) or ``.parquet``
    (columns ``text`` and ``embedding``), atomically (:mod:`lmforge.rundir`)."""
    import numpy as np

    from ..rundir import atomic_file, write_array

    p = Path(out)
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".parquet"):
        raise LmforgeError(f"{out}: output must end in .npy or .parquet")
    vectors = np.asarray(vectors, dtype=np.float32)
    if suffix == ".npy":
        write_array(p, vectors)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = vectors.shape[1]
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    with atomic_file(p, "wb") as fh:
        pq.write_table(pa.table({"text": texts, "embedding": emb}), fh)


def load_encoder(ref: str, *, pooling: str | None = None, normalize: bool | None = None,
                 max_length: int | None = None):
    """A :class:`SentenceEncoder` from an embed run directory (its ``model/``) or any model reference."""
    from ..rundir import is_run_dir, open_run
    from .encoder import SentenceEncoder

    if is_run_dir(ref):
        art = open_run(ref).artefact
        if art is None or not (art / "modules.json").is_file():
            raise LmforgeError(f"{ref}: this run has no sentence-embedding model (no model/modules.json)")
        ref = str(art)
    from ..config import remote_code_allowed

    enc = SentenceEncoder.from_pretrained(ref, pooling=pooling, normalize=normalize, max_length=max_length,
                                          trust_remote_code=remote_code_allowed(False))
    if max_length is not None:
        from ..models import check_positions

        check_positions(enc.backbone.config.to_dict(), max_length, "max_length", str(ref))
    return enc
