"""Readers: every format gives the same records, with a location per record for error messages."""
from __future__ import annotations

import bz2
import gzip
import json

import pytest

from lmforge.data import read_table
from lmforge.errors import LmforgeError

ROWS = [{"text": "good movie, really", "label": "pos"},
        {"text": "awful \"plot\"", "label": "neg"},
        {"text": "fine\tfilm", "label": "pos"}]


def _delimited(sep: str) -> str:
    def cell(v: str) -> str:
        return '"' + v.replace('"', '""') + '"' if any(c in v for c in (sep, '"', "\t", ",")) else v

    return "\n".join([sep.join(["text", "label"])] + [sep.join(cell(r[k]) for k in ("text", "label"))
                                                      for r in ROWS]) + "\n"


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]) + "\n")
    t = read_table(str(p))
    assert t.records == ROWS and len(t) == 3
    assert t.locs == ["line 1", "line 3", "line 4"]
    assert t.where(1) == f"{p} line 3"
    assert t.columns() == ["text", "label"]


def test_json_list_and_single_key_wrapper(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    assert read_table(str(tmp_path / "a.json")).records == ROWS
    assert read_table(str(tmp_path / "b.json")).records == ROWS
    (tmp_path / "c.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(LmforgeError, match="list of objects"):
        read_table(str(tmp_path / "c.json"))


@pytest.mark.parametrize("name,sep,opener", [
    ("d.csv", ",", open), ("d.tsv", "\t", open), ("d.csv.gz", ",", gzip.open), ("d.csv.bz2", ",", bz2.open),
    ("d.tsv.gz", "\t", gzip.open)])
def test_delimited_plain_and_compressed(tmp_path, name, sep, opener):
    p = tmp_path / name
    with opener(p, "wt", encoding="utf-8") as fh:
        fh.write(_delimited(sep))
    t = read_table(str(p))
    assert t.records == ROWS
    assert t.locs == ["row 2", "row 3", "row 4"]   # row 1 is the header


def test_csv_values_stay_text_and_empty_cells_are_none(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label,score\n007,1,\nNA,0,2.5\n")
    t = read_table(str(p))
    assert t.records == [{"text": "007", "label": "1", "score": None},
                         {"text": "NA", "label": "0", "score": "2.5"}]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS + [{"text": "x", "label": None}]), p)
    t = read_table(str(p))
    assert t.records == ROWS + [{"text": "x", "label": None}]
    assert t.locs[0] == "row 1"
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(LmforgeError, match="unreadable Parquet"):
        read_table(str(tmp_path / "broken.parquet"))


def test_plain_text_one_record_per_nonblank_line(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("first line\n\n   \nsecond  line  \n")
    t = read_table(str(p))
    assert t.records == [{"text": "first line"}, {"text": "second  line  "}]
    assert t.locs == ["line 1", "line 4"]


def test_pkg_reference_reads_a_file_inside_an_installed_package(tmp_path, monkeypatch):
    pkg = tmp_path / "lmforge_fake_datapkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "d.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert read_table("pkg://lmforge_fake_datapkg/data/d.jsonl").records == [ROWS[0]]
    with pytest.raises(LmforgeError, match="not installed"):
        read_table("pkg://lmforge_no_such_pkg/d.jsonl")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{\"text\": \"oops\",\n")
    with pytest.raises(LmforgeError) as exc:
        read_table(str(p))
    assert str(exc.value).startswith(f"{p} line 3: malformed JSON")
    p.write_text("[1, 2]\n")
    with pytest.raises(LmforgeError, match="line 1: expected a JSON object, got list"):
        read_table(str(p))


def test_malformed_csv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,b\nc,d,e\n")
    with pytest.raises(LmforgeError, match="malformed CSV"):
        read_table(str(p))


@pytest.mark.parametrize("name,content,message", [
    ("missing.jsonl", None, "data file not found"),
    ("d.xlsx", "x", "unsupported data format '.xlsx'"),
    ("d.jsonl.gz", "x", "compressed .jsonl is not supported"),
])
def test_unreadable_references(tmp_path, name, content, message):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(LmforgeError, match=message):
        read_table(str(p))
    with pytest.raises(LmforgeError, match="is a folder"):
        read_table(str(tmp_path))


# ---- encodings and broken compression: one line naming the file (and line) ------------------------------------
def test_bom_is_accepted_in_jsonl_txt_and_csv(tmp_path):
    from lmforge.data.readers import read_table

    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "x"}\n{"text": "y"}\n')
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbffirst\nsecond\n")
    (tmp_path / "a.csv").write_bytes(b"\xef\xbb\xbftext,label\nx,1\n")
    assert [r["text"] for r in read_table(str(tmp_path / "a.jsonl")).records] == ["x", "y"]
    assert [r["text"] for r in read_table(str(tmp_path / "a.txt")).records] == ["first", "second"]
    assert read_table(str(tmp_path / "a.csv")).records == [{"text": "x", "label": "1"}]


@pytest.mark.parametrize("name,data,where", [
    ("a.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "a.jsonl line 2: not UTF-8 text"),
    ("a.txt", b"ok\n\xff\n", "a.txt line 2: not UTF-8 text"),
    ("a.json", b'[{"text": "\xff"}]', "a.json line 1: not UTF-8 text"),
    ("a.csv", b"text,label\nok,1\ncaf\xe9,2\n", "a.csv line 3: not UTF-8 text"),
])
def test_non_utf8_is_one_line(tmp_path, name, data, where):
    from lmforge.data.readers import read_table

    (tmp_path / name).write_bytes(data)
    with pytest.raises(LmforgeError, match=where):
        read_table(str(tmp_path / name))


@pytest.mark.parametrize("ext", ["gz", "bz2", "xz"])
def test_truncated_compressed_csv_is_one_line(tmp_path, ext):
    import bz2
    import gzip
    import lzma

    from lmforge.data.readers import read_table

    packed = {"gz": gzip, "bz2": bz2, "xz": lzma}[ext].compress(b"text,label\n" + b"a fine line,1\n" * 2000)
    (tmp_path / f"d.csv.{ext}").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(LmforgeError, match=rf"d.csv.{ext}: truncated or corrupt compressed file"):
        read_table(str(tmp_path / f"d.csv.{ext}"))
