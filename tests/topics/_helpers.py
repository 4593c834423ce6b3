"""A tiny corpus in four word groups (the tiny tokenizer's words), and a recipe for it."""
from __future__ import annotations

import random
from pathlib import Path

GROUPS = [
    "good great fine lovely superb nice".split(),
    "bad awful poor boring dull terrible".split(),
    [f"w{i}" for i in range(0, 12)],
    [f"w{i}" for i in range(12, 24)],
]
FILLER = "movie film plot actor story scene".split()


def corpus(n_per_group: int = 30, seed: int = 0) -> list[dict]:
    """Documents of 8 words from one group + 2 filler words, with a date per document."""
    rng = random.Random(seed)
    rows = []
    for k in range(n_per_group):
        for g, words in enumerate(GROUPS):
            text = " ".join(rng.choice(words) for _ in range(8)) + " " + " ".join(rng.sample(FILLER, 2))
            rows.append({"text": text, "group": g, "date": f"2024-0{1 + k % 6}-1{g}"})
    return rows


def recipe(tmp: Path, model: str, data: str, **topics) -> dict:
    base = {"reduction": {"n_neighbors": 8, "n_components": 3},
            "clustering": {"min_cluster_size": 8},
            "vectorizer": {"min_df": 1, "stop_words": None},
            "keywords": {"candidates": 8, "top_n": 5, "diversity": 0.3},
            "stability_seeds": 2}
    base.update(topics)
    return {"task": "topics", "name": "topics_run", "output_dir": str(tmp / "runs"), "seed": 3,
            "model": {"name": model, "precision": "fp32"},
            "data": {"train": data, "columns": {"text": "text", "timestamp": "date"}},
            "train": {"progress": False}, "topics": base}
