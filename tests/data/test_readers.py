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
