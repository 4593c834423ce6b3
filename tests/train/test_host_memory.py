"""``device.release_host_memory``: glibc keeps freed heap pages of a CPU step; one trim per
optimizer step gives them back (the engine calls it after optimizer steps, within 2 % of the time)."""
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


def test_trims_keep_to_their_share_of_the_time_and_steps():
    """After a trim of c seconds the next runs no sooner than c / share later (a clock by hand)."""
    from lmforge.device import HostMemoryTrimmer

    ticks = iter([10.0, 10.1, 10.5, 14.9, 15.0, 15.2, 15.3])  # (now, after) pairs of the trims that run

    def clock():
        return next(ticks)

    trim = HostMemoryTrimmer(every=1, share=0.02, clock=clock)
    cpu = torch.device("cpu")
    ran = [trim(cpu)]             # 10.0 -> runs, took 0.1 s: next no sooner than 15.0
    ran.append(trim(cpu))         # 10.5: skipped
    ran.append(trim(cpu))         # 14.9: skipped
    ran.append(trim(cpu))         # 15.0 -> runs (0.2 s): next at 25.0
    ran.append(trim(cpu))         # 15.3: skipped
    assert ran == [True, False, False, True, False]
    assert trim.next == pytest.approx(25.0)

    steps = HostMemoryTrimmer(every=3, clock=lambda: 0.0)    # every 3rd call (time standing still)
    assert [steps(cpu) for _ in range(7)] == [True, False, False, True, False, False, True]


def test_the_engine_trims_within_its_budget(tmp_path, tiny_bert_dir, monkeypatch):
    from lmforge import device as dev
    from tests.train.test_engine import make_cfg, run_fit

    calls = []

    def counting(device):
        calls.append(device.type)
        return release_host_memory(device)

    monkeypatch.setattr(dev, "release_host_memory", counting)
    run_fit(make_cfg(tmp_path, tiny_bert_dir, max_steps=3))
    assert calls == ["cpu"]            # the first of 3 steps trims; the next would be the 9th
