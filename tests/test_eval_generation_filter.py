"""`lmforge eval RUN --task generation` applies the run's `data.where` as training did, says so
(`data_filter`: rows kept and dropped), and `--no-filter` scores every row; where no run filter can
apply, `--no-filter` is one line, exit 2, instead of being ignored."""
from __future__ import annotations

import json
import random

import pytest

from conftest import WORDS, write_jsonl, write_yaml
from lmforge.cli import main


def rows(n, seed):
    rng = random.Random(seed)
    return [{"dialogue": " ".join(a), "summary": " ".join(a[:2]), "keep": i % 2}
            for i, a in enumerate(rng.sample(WORDS[:16], 4) for _ in range(n))]


@pytest.fixture(scope="module")
def filtered_run(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen_filter")
    dev = write_jsonl(tmp / "dev.jsonl", rows(6, 2))  # 3 rows keep=1, 3 rows keep=0
    recipe = write_yaml(tmp / "r.yaml", {
        "task": "sft", "name": "sft-where", "output_dir": str(tmp / "runs"),
        "model": {"name": str(tiny_llama_dir), "precision": "fp32"},
        "data": {"train": str(write_jsonl(tmp / "train.jsonl", rows(16, 1))), "eval": str(dev),
                 "columns": {"completion": "summary"}, "max_length": 48, "where": {"keep": [1]}},
        "sft": {"template": "raw", "prompt_template": "story : {dialogue} :", "rouge_samples": 3, "max_new_tokens": 4},
        "adapter": {"kind": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "progress": False}})
    assert main(["train", str(recipe)]) == 0
    return tmp, tmp / "runs" / "sft-where", dev


def test_the_run_filter_is_reported_and_no_filter_scores_every_row(filtered_run):
    tmp, run, dev = filtered_run
    assert main(["eval", str(run), "--data", str(dev), "--task", "generation", "--out", str(tmp / "a.json")]) == 0
    kept = json.loads((tmp / "a.json").read_text())
    assert kept["n"] == 3
    assert kept["data_filter"] | {} == {"where": {"keep": [1]}, "applied": True, "source": kept["data_filter"]["source"],
                                        "rows": 6, "kept": 3, "dropped": 3}
    assert main(["eval", str(run), "--data", str(dev), "--task", "generation", "--no-filter",
                 "--out", str(tmp / "b.json")]) == 0
    every = json.loads((tmp / "b.json").read_text())
    assert every["n"] == 6 and every["data_filter"]["applied"] is False


def test_no_filter_where_no_run_filter_applies_is_one_line(filtered_run, tiny_llama_dir, capsys):
    tmp, run, dev = filtered_run
    for args in (["eval", str(run), "--data", str(dev), "--task", "perplexity", "--no-filter"],
                 ["eval", str(tiny_llama_dir), "--data", str(dev), "--task", "generation", "--no-filter",
                  "--prompt-template", "{dialogue}", "--reference", "summary"]):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--no-filter" in err[0]
