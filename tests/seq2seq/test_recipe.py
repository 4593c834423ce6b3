"""The FLAN-T5 DialogSum recipe's shape, offline: the recipe file as users run it, with a tiny random
T5 (saved to a temporary folder) in place of google/flan-t5-base and a few DialogSum-like records."""
from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import WORDS, write_jsonl
from lmforge.cli import main

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "sft_lora_flan_t5_dialogsum.yaml"


def dialogue_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a = rng.sample(WORDS[:20], 5)
        rows.append({"id": f"d{i}", "dialogue": " ".join(a), "summary": " ".join(a[:2]),
                     "summaries": [" ".join(a[:2]), " ".join(a[1:3])]})
    return rows


def test_recipe_runs_offline_with_a_tiny_t5(tmp_path, tiny_t5_dir, capsys):
    data = write_jsonl(tmp_path / "dialogsum.jsonl", dialogue_rows(20))
    runs = tmp_path / "runs"
    assert main(["train", str(RECIPE), f"model.name={tiny_t5_dir}", f"data.train={data}", f"output_dir={runs}",
                 "data.max_length=32", "sft.max_target_length=8", "sft.max_new_tokens=4", "sft.rouge_samples=4",
                 "train.epochs=1", "train.progress=false", "model.precision=fp32"]) == 0
    run = runs / "sft-lora-flan-t5-dialogsum"
    conf = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert conf["task_type"] == "SEQ_2_SEQ_LM" and conf["r"] == 32 and sorted(conf["target_modules"]) == ["q", "v"]
    metrics = json.loads((run / "eval.json").read_text())
    assert {"rouge1", "base_rouge1", "loss", "base_loss"} <= set(metrics)
