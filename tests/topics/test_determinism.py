"""Same seed and data -> the same topics bit for bit on CPU (UMAP with a random_state runs
single-threaded), through the whole task: embeddings, UMAP, HDBSCAN, c-TF-IDF, keywords."""
from __future__ import annotations

import numpy as np
import yaml

from conftest import write_jsonl
from lmforge.config import build_config
from lmforge.tasks import build_task
from topics._helpers import corpus, recipe


def _fit(tiny_bert_dir, tmp_path, name, seed):
    data = write_jsonl(tmp_path / "docs.jsonl", corpus(20))
    rec = recipe(tmp_path, str(tiny_bert_dir), str(data), pictures=False, stability_seeds=0)
    rec |= {"name": name, "seed": seed}
    cfg = build_config(yaml.safe_load(yaml.safe_dump(rec)))
    task = build_task(cfg)
    (tmp_path / name).mkdir()
    metrics = task.train_direct(tmp_path / name)
    return task.model, metrics


def test_same_seed_same_topics_bit_for_bit(tiny_bert_dir, tmp_path):
    a, ma = _fit(tiny_bert_dir, tmp_path, "a", 7)
    b, mb = _fit(tiny_bert_dir, tmp_path, "b", 7)
    assert a.arrays["reduced"].tobytes() == b.arrays["reduced"].tobytes()
    from lmforge.tasks.topics import map_2d  # the documents map (drawn only with pictures on)

    assert "map2d" not in a.arrays
    assert map_2d(a.arrays["reduced"], 7, 5).tobytes() == map_2d(b.arrays["reduced"], 7, 5).tobytes()
    np.testing.assert_array_equal(a.assignments, b.assignments)
    assert a.ctfidf.toarray().tobytes() == b.ctfidf.toarray().tobytes()
    assert a.topic_embeddings.tobytes() == b.topic_embeddings.tobytes()
    assert a.words == b.words and a.keywords == b.keywords
    assert {k: v for k, v in ma.items() if "seconds" not in k} == {k: v for k, v in mb.items() if "seconds" not in k}
    c, _ = _fit(tiny_bert_dir, tmp_path, "c", 8)
    assert c.arrays["reduced"].tobytes() != a.arrays["reduced"].tobytes()  # the seed is used
