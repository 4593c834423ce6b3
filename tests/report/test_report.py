"""The run report: pure analysis (hand-computed), SVG point counts, the page and the CLI."""
from __future__ import annotations

import json
import math
import re

import pytest

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.report import load_run, warnings_for, write_report
from lmforge.report.analysis import best_index, differing_config, early_peak, ema, loss_spikes, series
from lmforge.report.svg import line_chart, nice_ticks

from ._runs import make_run


def test_ema_debiased_hand_computed():
    # beta 0.5: m1 = 0.5*2 = 1 -> s1 = 1/0.5 = 2; m2 = 0.5*1 + 0.5*4 = 2.5 -> s2 = 2.5/0.75 = 3.3333
    s = ema([2.0, 4.0, float("nan"), 0.0], beta=0.5)
    assert s[0] == pytest.approx(2.0) and s[1] == pytest.approx(10 / 3) and s[2] == pytest.approx(10 / 3)
    # m3 = 0.5*2.5 + 0 = 1.25 -> s = 1.25/(1-0.125) = 1.428571
    assert s[3] == pytest.approx(1.25 / 0.875)


def test_spikes_peaks_best():
    flat = [1.0] * 12
    assert loss_spikes(flat) == []
    assert loss_spikes(flat[:10] + [2.5, 1.0]) == [10]
    assert loss_spikes(flat[:10] + [1.9]) == []  # under 2x the median
    assert best_index([0.3, 0.9, 0.9, float("nan")], greater=True) == 1
    assert best_index([0.3, 0.1, float("nan")], greater=False) == 1
    assert early_peak([1, 2, 3, 4], [0.8, 0.9, 0.7, 0.6], greater=True) == (2, 0.9, 0.6)
    assert early_peak([1, 2, 3, 4], [0.5, 0.6, 0.7, 0.8], greater=True) is None
    assert early_peak([1, 2, 3, 4], [0.8, 0.9, 0.89, 0.895], greater=True) is None  # within 2 %


def test_line_chart_counts_points_and_breaks_at_nan():
    svg = line_chart([{"name": "a", "x": [1, 2, 3, 4], "y": [1.0, float("nan"), 3.0, 4.0]}], title="t")
    d = re.search(r'd="([^"]*)"', svg).group(1)
    assert 'data-points="3"' in svg and d.count("M") == 2 and d.count("L") == 1
    assert nice_ticks(0, 1, 5) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    # a span below float resolution at its magnitude (a flat gradient-norm curve) ends, with its two ends
    assert nice_ticks(3.0, 3.0000000000000004) == [3.0, 3.0000000000000004]
    assert nice_ticks(1e6, 1e6 + 1e-10) == [1e6, 1e6 + 1e-10]


def test_warnings_spike_nan_early_peak_negative_kl(tmp_path):
    ok = load_run(make_run(tmp_path, "ok"))
    assert warnings_for(ok) == []
    w = warnings_for(load_run(make_run(tmp_path, "spiky", spike_at=30)))
    assert any(x.startswith("loss spike") and "30" in x for x in w)
    w = warnings_for(load_run(make_run(tmp_path, "nan", nan_at=25)))
    assert any("non-finite loss (nan) at step 25" in x for x in w)
    assert any("did not finish" in x for x in w)
    w = warnings_for(load_run(make_run(tmp_path, "early", peak_early=True)))
    assert any(x.startswith("eval accuracy peaked early") and "step 10" in x for x in w)
    w = warnings_for(load_run(make_run(tmp_path, "rl", kl=True)))
    assert any(x.startswith("negative KL (kl = -0.48 at step 1)") for x in w)


def test_report_page_single_run(tmp_path):
    run = make_run(tmp_path, "a", steps=60, eval_every=10)
    out = write_report([run])
    assert out == run / "report.html"
    page = out.read_text()
    assert "<script src" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert 'data-plot="train:loss"' in page and 'data-plot="confusion"' in page
    assert 'data-plot="ner_f1"' in page and 'data-plot="scatter:sts"' in page
    assert re.search(r'data-series="loss \(raw\)" data-points="60"', page)
    assert re.search(r'data-series="accuracy" data-points="6"', page)
    assert "good movie &lt;/script&gt;" in page  # samples are escaped
    blob = re.search(r'<script type="application/json" id="lmforge-data">(.*?)</script>', page, re.S).group(1)
    raw = json.loads(blob.replace("<\\/", "</"))
    assert len(raw["a"]["train"]) == 60 and len(raw["a"]["eval"]) == 6
    assert raw["a"]["final"]["samples"][0]["input"] == "good movie </script>"


def test_report_compare_overlays_and_differing_keys(tmp_path):
    a, b = make_run(tmp_path, "a", lr=1e-3, seed=1), make_run(tmp_path, "b", lr=3e-3, seed=2, steps=40)
    runs = [load_run(a), load_run(b)]
    diff = dict(differing_config(runs))
    assert diff["train.lr"] == [1e-3, 3e-3] and diff["train.max_steps"] == [60, 40] and "model.name" not in diff
    out = write_report([a, b], tmp_path / "cmp.html")
    page = out.read_text()
    assert 'data-series="a: loss (smoothed)" data-points="60"' in page
    assert 'data-series="b: loss (smoothed)" data-points="40"' in page
    assert "Config keys that differ" in page and "train.lr" in page


def test_report_errors_are_one_line(tmp_path):
    with pytest.raises(LmforgeError, match="no such run directory"):
        write_report([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="not an lmforge run directory"):
        write_report([tmp_path / "empty"])
    run = make_run(tmp_path, "a")
    with pytest.raises(LmforgeError, match="HTML file"):
        write_report([run], tmp_path / "x.txt")
    (run / "eval.json").write_text("{broken")
    with pytest.raises(LmforgeError, match="eval.json: not valid JSON"):
        write_report([run])


def test_cut_metrics_line_is_reported_not_fatal(tmp_path):
    run = make_run(tmp_path, "a")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"split": "train", "step": 61, "lo')
    w = warnings_for(load_run(run))
    assert any("1 unreadable line(s)" in x for x in w)
    assert len(series(load_run(run).train, "loss")[0]) == 60


def test_cli_report(tmp_path, capsys):
    run = make_run(tmp_path, "a")
    assert main(["report", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == str(run / "report.html")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip().startswith("lmforge: error:")


def test_train_writes_the_report(tmp_path, capsys, tiny_bert_dir):
    from tests.conftest import sentiment_rows, write_jsonl, write_yaml

    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(96, 1))
    recipe = write_yaml(tmp_path / "r.yaml", {
        "task": "classify", "name": "rep", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval_fraction": 0.25},
        "classify": {"mode": "full"},
        "train": {"max_steps": 6, "batch_size": 8, "log_every": 1, "eval_every": 3, "progress": False}})
    assert main(["train", str(recipe)]) == 0
    page = (tmp_path / "runs" / "rep" / "report.html").read_text()
    assert 'data-series="loss (raw)" data-points="6"' in page
    assert 'data-plot="eval:accuracy"' in page and 'data-plot="confusion"' in page
    assert math.isfinite(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"])
    info = json.loads((tmp_path / "runs" / "rep" / "run_info.json").read_text())
    assert info["train_size"] + info["eval_size"] == 96 and info["eval_size"] == 24
    assert 0 < info["trainable_params"] <= info["total_params"] and info["peak_rss_mb"] > 50
    assert len(info["environment_hash"]) == 12 and info["environment"]["torch"]
    assert ">train size</td><td class=\"num\">72<" in page.replace("\n", "")


def _png(width: int = 4, height: int = 3) -> bytes:
    """A valid RGB PNG (white), built by hand."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + b"\xff" * 3 * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_topic_pictures_and_table(tmp_path):
    run = tmp_path / "topics-run"
    (run / "topics").mkdir(parents=True)
    (run / "config.yaml").write_text("task: topics\nname: topics-run\nmodel:\n  name: minilm\n")
    (run / "metrics.jsonl").write_text("")
    (run / "topic_words.png").write_bytes(_png())
    (run / "eval.json").write_text(json.dumps({"n_topics": 2, "npmi": 0.1, "pictures": ["topic_words.png"]}))
    (run / "topics" / "topics.json").write_text(json.dumps({
        "topic_ids": [-1, 0, 1], "sizes": {"-1": 3, "0": 10, "1": 25},
        "words": {"0": [["pasta", 0.3], ["pizza", 0.2]], "1": [["goal", 0.4]]}, "labels": {"0": "0_pasta_pizza"}}))
    page = write_report([run]).read_text()
    assert page.count("data:image/png;base64,") == 1 and "topic_words.png" in page
    assert re.search(r'data-plot="topics".*?data-points="3"', page)
    assert page.index(">1<") < page.index(">0_pasta_pizza<")  # largest topic first
    assert "pasta, pizza" in page


def test_rows_dropped_or_cut_are_warnings(tmp_path):
    run = make_run(tmp_path, "cut", steps=20)
    final = json.loads((run / "eval.json").read_text())
    final["data_report"] = {
        "train": {"total": 400, "truncated": 14, "dropped": {"no trainable token after truncation to max_length=512":
                                                             {"count": 7, "first": "dev.jsonl line 76"}}},
        "eval": {"total": 100, "truncated": 0, "dropped": {}}}
    (run / "eval.json").write_text(json.dumps(final))
    warns = warnings_for(load_run(run))
    assert "train data: 7 dropped (no trainable token after truncation to max_length=512), 14 truncated of 400 rows" \
        in warns
    assert not any(w.startswith("eval data") for w in warns)
