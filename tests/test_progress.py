"""Progress for people: bars only on a terminal, concise lines with an estimate in logs."""
from __future__ import annotations

import io
import types
import zipfile

from lmforge.progress import LineProgress, progress, progress_line, tracked_tqdm


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_line_hand_computed_estimate():
    # 120 of 500 in 30 s -> 380 left at 4 units/s = 95 s
    line = progress_line("train", 120, 500, 30.0, {"loss": "0.4100"})
    assert line == "train 120/500 (24%) 0:30 elapsed, ~1:35 left, loss=0.4100"
    # resumed at 100: 20 units here in 30 s -> 380 left at 2/3 units/s = 570 s
    assert "~9:30 left" in progress_line("train", 120, 500, 30.0, done_here=20)
    assert progress_line("x", 5 << 20, 10 << 20, 3.0, unit="B").startswith("x 5.0MB/10.0MB (50%)")
    assert "left" not in progress_line("x", 0, 10, 1.0)


def test_no_tty_one_line_per_logging_interval_and_no_carriage_returns():
    out = io.StringIO()
    bar = progress(100, 0, True, "train", stream=out)
    assert isinstance(bar, LineProgress)
    for step in range(1, 101):
        bar.update(1)
        if step % 10 == 0:  # the engine's log_every
            bar.set_postfix(loss=f"{1 / step:.4f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # one per interval, close adds nothing new
    assert "\r" not in out.getvalue()
    assert lines[-1].startswith("train 100/100 (100%)") and "loss=0.0100" in lines[-1]


def test_update_alone_writes_on_time_interval_and_at_close():
    out = io.StringIO()
    bar = progress(1000, 0, True, "encode", stream=out, interval=3600)
    for _ in range(1000):
        bar.update(1)
    assert out.getvalue() == ""  # nothing until the interval passes
    bar.close()
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("encode 1000/1000")
    out = io.StringIO()
    bar = progress(5, 0, True, "encode", stream=out, interval=0.0)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert out.getvalue().count("\n") == 5


def test_tty_gets_a_bar_disabled_gets_nothing():
    from tqdm.auto import tqdm

    bar = progress(10, 0, True, "train", stream=_Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    out = io.StringIO()
    null = progress(10, 0, False, stream=out)
    null.update(3)
    null.set_postfix(loss=1)
    null.close()
    assert out.getvalue() == ""


def test_tracked_tqdm_routes_a_library_loop(capsys):
    mod = types.SimpleNamespace(tqdm=lambda it, desc=None: it)
    with tracked_tqdm(mod):
        got = list(mod.tqdm(range(7), desc="Converting and de-quantizing GGUF tensors..."))
    assert got == list(range(7))
    err = capsys.readouterr().err
    assert err.startswith("Converting and de-quantizing GGUF tensors 7/7 (100%)")
    assert mod.tqdm(range(2)) == range(2)  # restored


def test_split_zip_extraction_reports_progress(tmp_path, capsys):
    from lmforge.models import extract_split_zip

    z = tmp_path / "m.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("m/config.json", "{}")
        zf.writestr("m/weights.bin", b"\0" * 300_000)
    data = z.read_bytes()
    parts = [tmp_path / "m.zip.001", tmp_path / "m.zip.002"]
    parts[0].write_bytes(data[:1000])
    parts[1].write_bytes(data[1000:])
    out = extract_split_zip(parts, tmp_path / "cache" / "m")
    assert (out / "config.json").is_file() and (out / "weights.bin").stat().st_size == 300_000
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("join parts") and "(100%)" in line for line in err)
    assert any(line.startswith("extract") and "(100%)" in line for line in err)


def test_encoding_a_corpus_reports_progress_by_itself(tiny_bert_dir, capsys):
    from lmforge.embeddings.encoder import AUTO_PROGRESS, SentenceEncoder

    enc = SentenceEncoder.from_pretrained(tiny_bert_dir)
    capsys.readouterr()  # transformers' own loading bar
    enc.encode(["good movie"] * 10, precision="fp32")
    assert capsys.readouterr().err == ""  # small calls stay quiet
    enc.encode(["good movie", "the plot was dull"] * (AUTO_PROGRESS // 2), precision="fp32", batch_size=256)
    err = capsys.readouterr().err.splitlines()
    assert err and err[-1].startswith(f"encode {AUTO_PROGRESS}/{AUTO_PROGRESS} (100%)")
    assert all("\r" not in line for line in err)


def test_train_in_a_log_writes_one_line_per_logging_interval(tmp_path, capsys, tiny_bert_dir):
    from lmforge.cli import main
    from tests.conftest import sentiment_rows, write_jsonl, write_yaml

    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(80, 1))
    recipe = write_yaml(tmp_path / "r.yaml", {
        "task": "classify", "name": "p", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_bert_dir), "precision": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval_fraction": 0.2},
        "classify": {"mode": "full"},
        "train": {"max_steps": 6, "batch_size": 8, "log_every": 2, "eval_every": 100, "progress": True}})
    assert main(["train", str(recipe)]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all("loss=" in line and "elapsed" in line for line in lines) and "\r" not in err


def test_time_line_and_postfix_line_for_the_same_unit_are_one_line():
    """A slow loop (every update past the interval) that sets a postfix every 3rd unit, as the
    engine does at log_every: one line per unit, never two for the same count."""
    out = io.StringIO()
    bar = progress(9, 0, True, "train", stream=out, interval=0.0)
    for step in range(1, 10):
        bar.update(1)
        if step % 3 == 0:
            bar.set_postfix(loss=f"{1 / step:.3f}")
    bar.close()
    lines = out.getvalue().splitlines()
    counts = [ln.split()[1] for ln in lines]
    # before the first postfix, time lines go out at once (3/9 then again with its postfix); after it,
    # a time line waits one update and gives way to the postfix line of the same unit
    assert counts == ["1/9", "2/9", "3/9", "3/9"] + [f"{i}/9" for i in range(4, 10)]
    assert "loss=0.333" in lines[3] and "loss=0.167" in lines[6] and "loss=0.111" in lines[-1]


def test_quiet_libraries_turns_transformers_bars_off_in_a_fresh_process():
    import subprocess
    import sys

    code = ("from transformers.utils import logging as l; before = l.is_progress_bar_enabled(); "
            "from lmforge.progress import quiet_libraries; quiet_libraries(); "
            "print(before, l.is_progress_bar_enabled(), l.get_verbosity() == l.ERROR)")
    import os

    env = {k: v for k, v in os.environ.items()  # an earlier in-process CLI test may have set these
           if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.split() == ["True", "False", "True"]  # on by default; off (and errors only) after


def test_the_demo_quiets_the_libraries_as_the_cli_does():
    import inspect

    from lmforge import cli, demo

    assert "quiet_libraries()" in inspect.getsource(demo.run)
    assert "quiet_libraries()" in inspect.getsource(cli._setup_logging)
