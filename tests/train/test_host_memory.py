"""``device.release_host_memory``: glibc keeps freed heap pages of a CPU step; one trim per
optimizer step gives them back (the engine calls it after every step)."""
from __future__ import annotations

import platform

import numpy as np
import psutil
import pytest
import torch

from lmforge.device import release_host_memory
from lmforge.train import engine

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")


@glibc
def test_trim_returns_freed_heap_pages():
    rss = psutil.Process().memory_info
    big = np.ones(16 << 20, dtype=np.uint8)  # mmapped; freeing it raises glibc's mmap threshold to 16 MB
    del big
    blocks = [np.ones(1 << 20, dtype=np.uint8) for _ in range(300)]  # 300 MB from the heap now
    keep = blocks.pop()                                                # pins the heap's top
    del blocks
    before = rss().rss
    assert release_host_memory(torch.device("cpu")) is True
    after = rss().rss
    assert before - after > 150 << 20, (before >> 20, after >> 20)
    del keep


def test_no_trim_off_cpu_or_when_switched_off(monkeypatch):
    assert release_host_memory(torch.device("meta")) is False
    monkeypatch.setenv("LMFORGE_NO_MALLOC_TRIM", "1")
    assert release_host_memory(torch.device("cpu")) is False


def test_the_engine_trims_once_per_optimizer_step(tmp_path, tiny_bert_dir, monkeypatch):
    from tests.train.test_engine import make_cfg, run_fit

    calls = []

    def counting(device):
        calls.append(device.type)
        return release_host_memory(device)

    monkeypatch.setattr(engine, "release_host_memory", counting)
    run_fit(make_cfg(tmp_path, tiny_bert_dir, max_steps=3))
    assert calls == ["cpu"] * 3
