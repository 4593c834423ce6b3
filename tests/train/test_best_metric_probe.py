"""``check_best_metric`` evaluates a few eval rows to validate the metric name; that probe's
warnings (say, a class absent from 8 rows) must not reach the user's log, and the logger must
be left as it was."""
from __future__ import annotations

import logging

import pytest

from lmforge.config import build_config
from lmforge.errors import LmforgeError
from lmforge.rundir import write_jsonl
from lmforge.tasks.classify import ClassifyTask
from lmforge.train.engine import check_best_metric

from tests.conftest import sentiment_rows


class WarningTask(ClassifyTask):
    def evaluate(self, items=None):
        logging.getLogger("lmforge.tasks.classify").warning("class 'neg' is never predicted (1 gold examples)")
        return super().evaluate(items)


def _task(tmp_path, model_dir, metric):
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(16, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(8, seed=2))
    cfg = build_config({"task": "classify", "output_dir": str(tmp_path / "runs"),
                        "model": {"name": str(model_dir), "precision": "fp32"},
                        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
                        "classify": {"mode": "full"}, "train": {"best_metric": metric, "progress": False}})
    return WarningTask(cfg), cfg


def test_probe_keeps_its_warnings_and_restores_the_logger(tmp_path, tiny_bert_dir, caplog):
    task, cfg = _task(tmp_path, tiny_bert_dir, "accuracy")
    before = logging.getLogger("lmforge").level
    with caplog.at_level(logging.WARNING):
        check_best_metric(task, cfg)
        assert not [r for r in caplog.records if "never predicted" in r.getMessage()]
        task.evaluate()  # a real evaluation afterwards still warns
    assert [r for r in caplog.records if "never predicted" in r.getMessage()]
    assert logging.getLogger("lmforge").level == before


def test_unknown_metric_still_refused_and_logger_restored(tmp_path, tiny_bert_dir):
    task, cfg = _task(tmp_path, tiny_bert_dir, "precision_at_7")
    before = logging.getLogger("lmforge").level
    with pytest.raises(LmforgeError, match="not an eval metric"):
        check_best_metric(task, cfg)
    assert logging.getLogger("lmforge").level == before
