"""Device and precision decisions: the one place that picks them.

``auto`` precision means: bf16 (or fp16 without bf16 support) autocast on CUDA; on CPU, bf16
autocast when the CPU has native bf16 matmul (AVX512-BF16 / AMX), where it is several
times faster than fp32; fp32 otherwise. Master weights stay fp32 in training.

On a CPU without native bf16, ``auto`` inference of a causal LM stores its linear weights in bf16
and computes in fp32 (:mod:`lmforge.bf16_weights`); ``fp32`` keeps them fp32.

``int8`` (CPU inference of BERT-family encoders only: ``embed``, index builds, topics) runs the
encoder's linear layers as int8 x int8 -> int32 GEMMs around fp32 activations
(:mod:`lmforge.fast_encode`); everything else about such a placement is fp32.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from dataclasses import dataclass

import torch

from .errors import LmforgeError

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
EAGER_MAX_LENGTH = 256  # longest rows for which CPU autocast training prefers eager attention


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU executes bf16 matmul natively (AVX512_BF16 or AMX)."""
    if os.environ.get("LMFORGE_CPU_BF16") in ("0", "1"):
        return os.environ["LMFORGE_CPU_BF16"] == "1"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def _warn_slow_bf16() -> None:
    """Once per process: bf16 asked for on a CPU that emulates it."""
    logging.getLogger("lmforge").warning(
        "precision bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): emulated, measured ~4x slower than "
        "fp32 on an AVX2-only CPU; precision: auto picks fp32 here")


@functools.lru_cache(maxsize=None)
def onednn_linear(dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked linear (``mkldnn._reorder_linear_weight`` + ``_linear_pointwise``)
    runs ``dtype`` weights on this CPU. bf16 needs AVX512-BW/VL/DQ or AVX-NE-CONVERT: on an AVX2-only
    CPU the reorder raises, so every prepacking fast path asks here first and keeps the plain op."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
            or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


ONEDNN_CACHE_CAPACITY = 64  # oneDNN primitives (and torch's ideep LRU) kept per process


def bound_onednn_caches(capacity: int | None = None) -> bool:
    """Bound oneDNN's primitive cache and torch's ideep LRU cache (env vars read at their first
    use, so this only acts before the process's first oneDNN op; a user's own setting wins).

    Why: a oneDNN linear keeps a primitive plus an output-sized buffer per distinct row count M,
    and unpadded/packed batches give nearly every batch its own M. With the default capacity
    (1024) they are never evicted: measured +472 MB for 40 new M near 4,000 rows of a
    (1536 x 384) bf16 linear, +949 MB for 80; with both caches at 8, +153 / +131 MB, and the
    first call at a new M is faster (27 vs 30 ms: fewer fresh pages). Capacity 64 keeps every
    primitive a training step cycles through (classify LoRA step: 16 measured 8 % slower, 64 the
    same speed as the default; SFT at 512 tokens the same speed and RSS) and cut a 400-passage
    index build's peak from 719 to 651 MB at the same CPU. The bound is a count: up to 64
    output-sized buffers (~12 MB each at 4,000 x 1,536 bf16) can stay. Returns True when both variables were ours to set."""
    ours = False
    for var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        if var not in os.environ:
            os.environ[var] = str(ONEDNN_CACHE_CAPACITY if capacity is None else capacity)
            ours = True
    return ours


def pick_device(requested: str = "auto") -> torch.device:
    """Resolve ``auto``/``cpu``/``cuda``/``cuda:N`` honouring LOCAL_RANK under torchrun; on CPU
    also bounds oneDNN's caches (:func:`bound_onednn_caches`)."""
    dev = _pick_device(requested)
    if dev.type == "cpu":
        bound_onednn_caches()
    return dev


def _pick_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    from .config import check_device

    try:
        dev = torch.device(check_device(requested))
    except (ValueError, RuntimeError) as exc:
        raise LmforgeError(f"device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(f"device '{requested}' requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LmforgeError(f"device '{requested}' requested but MPS is not available")
    return dev


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Compute dtype for ``precision`` on ``device`` (autocast dtype, or fp32)."""
    if precision not in PRECISIONS:
        raise LmforgeError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    if precision in ("fp32", "int8"):
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


@dataclass(frozen=True)
class Placement:
    """Where and how a run computes: device, autocast dtype, grad scaler need."""

    device: torch.device
    dtype: torch.dtype
    int8: bool = False  # encoder inference with int8 linear layers (fp32 otherwise)
    bf16_weights: bool = False  # causal-LM inference stores linear weights in bf16, computes fp32 (for_inference)

    @classmethod
    def resolve(cls, device: str = "auto", precision: str = "auto") -> "Placement":
        dev = pick_device(device)
        if precision == "bf16" and dev.type == "cpu" and not cpu_has_fast_bf16():
            _warn_slow_bf16()
        if precision == "int8" and dev.type != "cpu":
            raise LmforgeError(f"precision int8 is CPU encoder inference; on {dev.type} use auto, bf16 or fp16")
        dtype = pick_dtype(precision, dev)
        weights16 = precision == "auto" and dev.type == "cpu" and dtype == torch.float32
        return cls(dev, dtype, precision == "int8", weights16)

    @property
    def autocast_enabled(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self):
        """Autocast context for forward passes (a no-op in fp32)."""
        if not self.autocast_enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def attn_implementation(self, requested: str = "auto", max_length: int | None = None,
                            encoder: bool = False) -> str:
        """Attention kernel for transformers: on CPU with bf16/fp16 autocast the eager path
        (batched matmuls) trains much faster than SDPA's CPU flash kernel for short rows, whose
        backward costs about the same per token at any length; eager's cost grows with the row
        length (measured here, 2048 bf16 tokens, 9 heads: eager 50/82/131/310 ms per layer
        forward+backward at rows of 64/128/256/512 tokens, SDPA 130-145 ms). So rows longer than
        ``EAGER_MAX_LENGTH`` (``max_length``, when the caller knows it) use SDPA. (SDPA's forward
        alone is faster, but in DPO's reference pass over short rows switching kernels measured
        no gain, so the choice depends on the row length only.) ``encoder``: an encoder trains with
        eager in fp32 too (an AVX2-only CPU, where ``auto`` is fp32): MiniLM LoRA classification with
        attention dropout 0.1, 20 steps, fresh processes alternating, 47.0 vs 38.8 samples/CPU-s at
        1 thread (medians of 3) and 76-90 vs 71 samples/s at 2 threads (eager's dropout is
        :mod:`lmforge.fast_dropout`'s; SDPA's draws a Bernoulli per weight). Causal LMs in fp32 keep
        SDPA (not measured; their packing widths follow the kernel). SDPA elsewhere."""
        if requested != "auto":
            return requested
        short = max_length is None or max_length <= EAGER_MAX_LENGTH
        if self.device.type == "cpu" and (self.autocast_enabled or encoder) and short:
            return "eager"
        return "sdpa"

    def unpad(self, requested: str = "auto") -> bool:
        """Whether encoder batches run unpadded (:mod:`lmforge.unpad`: linear layers on real tokens
        only, attention per sequence). On with ``attn_implementation: auto`` on every device (index
        ops only); an explicit ``eager``/``sdpa`` keeps transformers' plain padded path."""
        return requested == "auto"

    def cast_frozen(self, model) -> int:
        """Store frozen floating-point parameters in the compute dtype (autocast runs would cast
        them every step anyway). Trainable parameters stay fp32 master weights.  Returns count."""
        if not self.autocast_enabled:
            return 0
        n = 0
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != self.dtype:
                p.data = p.data.to(self.dtype)
                n += 1
        return n

    def for_inference(self, model) -> int:
        """Prepare a model that will only run inference (generation, scoring): when this placement
        computes in bf16/fp16, store its floating-point parameters in that dtype, so autocast does
        not re-cast every weight at every forward (one forward per generated token: on CPU the
        casts cost as much as the matmuls at batch 1). Buffers (rotary frequencies ...) are kept.
        ``auto`` on a CPU without native bf16 (fp32 compute): a causal LM's linear weights are
        stored in bf16 and applied in fp32 (:mod:`lmforge.bf16_weights`: decoding reads half the
        bytes); ``fp32`` asked for explicitly keeps every weight fp32.
        Do not train the model afterwards. Returns the number of parameters (layers) cast."""
        if not self.autocast_enabled:
            if not self.bf16_weights:
                return 0
            from . import bf16_weights

            return bf16_weights.store_bf16_weights(model) if bf16_weights.applies(model) else 0
        n = 0
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != self.dtype:
                p.data = p.data.to(self.dtype)
                n += 1
        return n

    def checkpoint_activations(self, model) -> int:
        """Activation (gradient) checkpointing on every transformers model inside ``model``: each
        block's activations are recomputed in the backward pass instead of kept (peak memory of
        long sequences drops by about the per-block activations times the depth, for about one
        more forward pass of compute). Non-reentrant (works with frozen bases and adapters, any
        device). Returns the number of models switched on."""
        n = 0
        for m in model.modules():
            if not getattr(m, "supports_gradient_checkpointing", False):
                continue
            on = getattr(m, "activation_checkpointing_enable", None)  # transformers >= 5.2x
            if on is not None and not m.is_activation_checkpointing:
                on(activation_checkpointing_kwargs={"use_reentrant": False})
                n += 1
            elif on is None and hasattr(m, "gradient_checkpointing_enable") and not m.is_gradient_checkpointing:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                n += 1
        return n

    def grad_scaler(self):
        """A GradScaler for fp16 on CUDA, otherwise None."""
        if self.device.type == "cuda" and self.dtype == torch.float16:
            return torch.amp.GradScaler("cuda")
        return None

    @property
    def name(self) -> str:
        if self.int8:
            return "int8"
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def describe(self) -> str:
        return f"{self.device.type} {self.name}"


def move(batch, device: torch.device):
    """Move every tensor in a (nested) dict/list batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(v, device) for v in batch)
    return batch


def inference_workers(device: torch.device, jobs: int) -> int:
    """How many Python worker threads run independent inference batches (:func:`run_batches`):
    on CPU, torch's intra-op thread count (each worker then runs its kernels on one thread), at
    most one per batch; 1 on every other device (CUDA keeps one stream of batches) and with
    ``LMFORGE_INFERENCE_WORKERS=1``.

    Why: an encoder batch's kernels at 2 intra-op threads cost ~45 % more CPU than at 1 (many
    small parallel regions: per-sequence attention, LayerNorm, oneDNN GEMMs of a few hundred
    rows); two batches side by side at 1 thread each keep the 1-thread cost per batch and use
    both cores (measured in ``bench/encode.py``)."""
    if device.type != "cpu" or jobs < 2:
        return 1
    env = os.environ.get("LMFORGE_INFERENCE_WORKERS")
    n = int(env) if env and env.isdigit() and int(env) > 0 else torch.get_num_threads()
    return max(1, min(n, jobs))


def run_batches(fn, jobs, device: torch.device, context=contextlib.nullcontext, parallel: bool = True) -> None:
    """Call ``fn(job)`` for every job (order of completion unspecified; ``fn`` writes its own
    result), on :func:`inference_workers` threads pulling the next job in order (one thread, in
    order, when ``parallel`` is False: ``fn`` not safe to run concurrently).

    Each worker enters ``context()`` once (thread-local state such as ``torch.inference_mode``
    and autocast must be set per thread) and, with several workers, sets torch's intra-op threads
    to 1 for itself (OpenMP's thread count is per calling thread; torch ops release the GIL).
    Each job then runs the same 1-thread kernels as a sequential run at 1 thread, so results
    are bit-identical to it. The caller's thread count is restored afterwards (``set_num_threads``
    also sets the default new threads start with). The first exception stops the other workers
    and is raised here. Afterwards the C heap's free pages go back to the OS (once per call)."""
    jobs = list(jobs)
    n = inference_workers(device, len(jobs)) if parallel else 1
    if n == 1:
        with context():
            for job in jobs:
                fn(job)
        return
    import threading

    threads_before = torch.get_num_threads()
    it, lock, errors = iter(jobs), threading.Lock(), []

    def worker() -> None:
        torch.set_num_threads(1)
        try:
            with context():
                while not errors:
                    with lock:
                        job = next(it, _DONE)
                    if job is _DONE:
                        return
                    fn(job)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    # the calling thread is worker 0: one C-heap arena fewer (each new thread gets its own)
    pool = [threading.Thread(target=worker, name=f"lmforge-infer-{i}", daemon=True) for i in range(1, n)]
    try:
        for t in pool:
            t.start()
        worker()
        for t in pool:
            t.join()
    finally:
        torch.set_num_threads(threads_before)
        release_host_memory(device)  # the finished workers' arenas keep their batches' pages otherwise
    if errors:
        raise errors[0]


_DONE = object()


@functools.lru_cache(maxsize=None)
def _libc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another OS)."""
    import ctypes
    import ctypes.util

    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_host_memory(device: torch.device) -> bool:
    """Give the C heap's free pages back to the OS after a CPU training step.

    glibc keeps the memory of freed activations once its dynamic mmap threshold has risen, so a
    CPU run's resident size ratchets up step after step (measured on the BoolQ retriever: 3.37 GB
    peak, 2.0 -> 2.9 GB between steps; with a trim per step 0.6-0.8 GB between steps, 0.84 GB
    lower peak, less system CPU). A no-op on CUDA (torch's caching allocator owns that memory)
    and where the C library has no ``malloc_trim``. Returns whether a trim ran.
    """
    if device.type != "cpu" or os.environ.get("LMFORGE_NO_MALLOC_TRIM"):
        return False
    fn = _libc_trim()
    if fn is None:
        return False
    fn(0)
    return True


class HostMemoryTrimmer:
    """:func:`release_host_memory` within a budget: once every ``every`` calls (optimizer steps) at
    most, and with at most ``share`` of the wall time in the trim calls themselves.

    A trim hands every free heap page back, so the next step page-faults (and zeroes) its
    activations again: once per optimizer step it cost 12-18 % of a MiniLM training step (prompt
    tuning 57 vs 68 samples per CPU second). Every 8th step pays that on one step in eight; the heap
    still goes back to the OS every few steps, which is what keeps the resident size from
    ratcheting up. After a trim call that took ``c`` seconds the next runs no sooner than
    ``c / share`` later.
    """

    def __init__(self, every: int = 8, share: float = 0.02, clock=time.perf_counter):
        self.every, self.share, self.clock = every, share, clock
        self.next, self.calls = float("-inf"), 0

    def __call__(self, device: torch.device) -> bool:
        self.calls += 1
        now = self.clock()
        if (self.calls - 1) % self.every or now < self.next:
            return False
        ran = release_host_memory(device)
        if ran:
            self.next = now + (self.clock() - now) / self.share
        return ran
