"""Parallel encode on CPU (lmforge.device.run_batches): worker threads at 1 intra-op thread each give
the 1-thread run's vectors bit for bit, in input order."""
import threading

import numpy as np
import pytest
import torch

from lmforge.device import Placement, inference_workers, run_batches
from lmforge.embeddings import SentenceEncoder


@pytest.fixture()
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_workers_policy(threads, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("LMFORGE_INFERENCE_WORKERS", raising=False)
    torch.set_num_threads(2)
    assert inference_workers(cpu, 10) == 2
    assert inference_workers(cpu, 1) == 1  # one batch: no worker
    assert inference_workers(torch.device("cuda"), 10) == 1  # CUDA keeps one stream of batches
    torch.set_num_threads(1)
    assert inference_workers(cpu, 10) == 1
    monkeypatch.setenv("LMFORGE_INFERENCE_WORKERS", "3")
    assert inference_workers(cpu, 10) == 3 and inference_workers(cpu, 2) == 2


def test_run_batches_workers_run_single_threaded_and_restore(threads, monkeypatch):
    """Every job runs once, on two distinct worker threads that each see 1 intra-op thread and
    their own context; the caller's thread count is back afterwards."""
    monkeypatch.delenv("LMFORGE_INFERENCE_WORKERS", raising=False)
    torch.set_num_threads(2)
    seen, lock, entered = [], threading.Lock(), []

    def fn(job):
        assert torch.is_inference_mode_enabled()  # the worker's context is on in its own thread
        x = torch.randn(64, 64) @ torch.randn(64, 64)  # real work, so both workers get jobs
        with lock:
            seen.append((job, threading.current_thread().name, torch.get_num_threads(), float(x.sum()) != 0.5))

    def context():
        entered.append(threading.current_thread().name)
        return torch.inference_mode()

    run_batches(fn, range(40), torch.device("cpu"), context)
    assert sorted(j for j, *_ in seen) == list(range(40))
    assert {n for _, _, n, _ in seen} == {1}
    assert sorted(entered) == sorted([threading.current_thread().name, "lmforge-infer-1"])  # caller = worker 0
    assert torch.get_num_threads() == 2
    seen.clear()
    run_batches(fn, range(5), torch.device("cpu"), context, parallel=False)  # in order, this thread
    assert [j for j, *_ in seen] == list(range(5)) and {t for _, t, _, _ in seen} == {threading.current_thread().name}


def test_run_batches_raises_a_workers_error(threads):
    torch.set_num_threads(2)

    def fn(job):
        if job == 3:
            raise ValueError("job 3")

    with pytest.raises(ValueError, match="job 3"):
        run_batches(fn, range(8), torch.device("cpu"))
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_parallel_encode_is_bit_identical_to_one_thread(tiny_bert_dir, threads, monkeypatch, precision):
    """Two workers (torch at 2 threads) == a sequential run at 1 thread, row for row, bit for bit.
    In bf16 a worker left at 2 intra-op threads would switch the fast path's attention to SDPA
    (other bits); sequential at 2 threads is not what the workers compute."""
    from tests.embeddings._helpers import sentences

    monkeypatch.delenv("LMFORGE_INFERENCE_WORKERS", raising=False)
    texts = sentences(37, seed=11) + ["good " * 40, "bad", ""]  # lengths 1 .. max_length
    enc = SentenceEncoder.from_pretrained(tiny_bert_dir)
    place = Placement(torch.device("cpu"), torch.float32 if precision == "fp32" else torch.bfloat16)
    enc.to_inference(place)
    torch.set_num_threads(1)
    one = enc.encode(texts, batch_size=3, placement=place)
    torch.set_num_threads(2)
    assert inference_workers(place.device, 14) == 2
    two = enc.encode(texts, batch_size=3, placement=place)
    assert torch.get_num_threads() == 2
    np.testing.assert_array_equal(two, one)
    enc.fast_path = False  # transformers' path stays sequential (hooks may record state): still right
    plain = enc.encode(texts, batch_size=3, placement=place)
    assert np.abs(plain - one).max() < (1e-5 if precision == "fp32" else 0.05)


def test_code_path_names_the_computation(tiny_bert_dir, threads, monkeypatch):
    """Caches of encode's vectors (topics embeddings) key on it: it changes with the path and with
    kernels whose bits differ (2 threads without workers), not with what gives the same bits."""
    monkeypatch.delenv("LMFORGE_INFERENCE_WORKERS", raising=False)
    enc = SentenceEncoder.from_pretrained(tiny_bert_dir)
    place = Placement(torch.device("cpu"), torch.bfloat16)
    enc.to_inference(place)
    torch.set_num_threads(1)
    one = enc.code_path(place)
    torch.set_num_threads(2)
    assert enc.code_path(place) == one and one.startswith("fast_encode-")  # workers: 1-thread kernels
    monkeypatch.setenv("LMFORGE_INFERENCE_WORKERS", "1")
    assert enc.code_path(place) != one
    enc.fast_path = False
    assert enc.code_path(place).startswith("transformers-")
