"""The one owner of the run-directory layout and of every atomic writer.

A run directory ``runs/<name>/`` holds::

    config.yaml        the resolved config (written once the run has started cleanly)
    metrics.jsonl      one JSON object per logged step (+ tensorboard/)
    checkpoints/       step-N folders, written as .tmp-step-N and renamed
    adapter/ | model/  the trained artefact (PEFT adapter folder or Hugging Face folder)
    best/              the artefact at the best eval step (when a best metric is tracked)
    eval.json          the final metrics
    ...                task extras (labels.json, head/, topics/, index/, report.html)

Every file a command writes goes through the writers (``writers.py``): a temporary sibling (``.tmp-*``)
is written, flushed and renamed into place, so a killed process never leaves a half-written
file under the final name. ``layout.py`` names the parts, recognises a run, reads its config
(the only reader of ``config.yaml``) and chooses its artefact (``open_run``); ``runs.py`` creates,
overwrites and resumes runs without losing data. Nothing here imports anything above ``config``.
"""
from __future__ import annotations

from .layout import (ADAPTER, BEST, CHECKPOINTS, CONFIG, EVAL, METRICS, MODEL, TENSORBOARD, TMP_PREFIX, OpenRun,
                     is_run_dir, open_run, read_config, task_section)
from .runs import (RESUMABLE_KEYS, RESUME_KEY, check_run, clean_stale_tmp_of, config_changes, prepare_run,
                   save_config)
from .writers import (atomic_dir, atomic_file, clean_stale_tmp, commit_dir, staging_dir, truncate_metrics,
                      write_array, write_bytes, write_json, write_jsonl, write_safetensors, write_text)

__all__ = ["ADAPTER", "BEST", "CHECKPOINTS", "CONFIG", "EVAL", "METRICS", "MODEL", "RESUMABLE_KEYS", "RESUME_KEY",
           "TENSORBOARD", "TMP_PREFIX", "OpenRun", "atomic_dir", "atomic_file", "check_run", "clean_stale_tmp",
           "clean_stale_tmp_of", "commit_dir", "config_changes", "is_run_dir", "open_run", "prepare_run",
           "read_config", "save_config", "staging_dir", "task_section", "truncate_metrics", "write_array", "write_bytes",
           "write_json", "write_jsonl", "write_safetensors", "write_text"]
