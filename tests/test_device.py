"""Device and precision decisions (lmforge.device is the only place that makes them)."""
from __future__ import annotations

import pytest
import torch

from lmforge.device import Placement, cpu_has_fast_bf16, move, pick_dtype
from lmforge.errors import LmforgeError


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set LMFORGE_CPU_BF16 for one test (the detection is cached, so clear it both ways)."""

    def set_(flag: str):
        monkeypatch.setenv("LMFORGE_CPU_BF16", flag)
        cpu_has_fast_bf16.cache_clear()

    yield set_
    cpu_has_fast_bf16.cache_clear()


def test_auto_precision_is_bf16_on_a_fast_bf16_cpu(cpu_bf16):
    cpu_bf16("1")
    assert cpu_has_fast_bf16() is True
    p = Placement.resolve("cpu", "auto")
    assert p.device == torch.device("cpu") and p.dtype == torch.bfloat16
    assert p.autocast_enabled and p.describe() == "cpu bf16"
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with p.autocast():
        out = a @ b
    assert out.dtype == torch.bfloat16


def test_auto_precision_is_fp32_without_fast_bf16(cpu_bf16):
    cpu_bf16("0")
    assert cpu_has_fast_bf16() is False
    p = Placement.resolve("cpu", "auto")
    assert p.dtype == torch.float32 and not p.autocast_enabled and p.name == "fp32"
    with p.autocast():
        out = torch.randn(4, 8) @ torch.randn(8, 3)
    assert out.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")


def test_explicit_precision_wins_over_detection(cpu_bf16):
    cpu_bf16("1")
    assert Placement.resolve("cpu", "fp32").dtype == torch.float32
    cpu_bf16("0")
    assert Placement.resolve("cpu", "bf16").dtype == torch.bfloat16
    assert pick_dtype("fp16", torch.device("cpu")) == torch.float16


def test_bad_precision_and_unavailable_device_are_user_errors():
    with pytest.raises(LmforgeError, match="precision must be one of"):
        Placement.resolve("cpu", "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(LmforgeError, match="CUDA is not available"):
            Placement.resolve("cuda:0", "fp32")
        assert Placement.resolve("auto", "fp32").device == torch.device("cpu")


def test_no_grad_scaler_on_cpu():
    assert Placement.resolve("cpu", "fp32").grad_scaler() is None
    assert Placement.resolve("cpu", "fp16").grad_scaler() is None


def test_move_keeps_structure_and_leaves_non_tensors():
    batch = {"ids": torch.ones(2, 3, dtype=torch.long), "nested": [torch.zeros(1), ("x", torch.ones(1))],
             "meta": "keep", "n": 3}
    out = move(batch, torch.device("cpu"))
    assert set(out) == set(batch) and out["meta"] == "keep" and out["n"] == 3
    assert isinstance(out["nested"], list) and isinstance(out["nested"][1], tuple)
    assert out["nested"][1][0] == "x"
    assert torch.equal(out["ids"], batch["ids"]) and out["ids"].device.type == "cpu"


def test_attention_kernel_follows_precision_and_row_length():
    from lmforge.device import EAGER_MAX_LENGTH

    bf16, fp32 = Placement.resolve("cpu", "bf16"), Placement.resolve("cpu", "fp32")
    assert fp32.attn_implementation() == "sdpa"  # a causal LM in fp32
    assert fp32.attn_implementation(encoder=True) == "eager"  # encoders train faster with eager in fp32 too
    assert fp32.attn_implementation("auto", EAGER_MAX_LENGTH + 1, encoder=True) == "sdpa"
    assert bf16.attn_implementation() == "eager"  # callers that do not know the length
    assert bf16.attn_implementation("auto", EAGER_MAX_LENGTH) == "eager"
    assert bf16.attn_implementation("auto", EAGER_MAX_LENGTH + 1) == "sdpa"  # long rows
    assert bf16.attn_implementation("sdpa", 64) == "sdpa" and fp32.attn_implementation("eager", 4096) == "eager"


def test_onednn_linear_says_where_the_bf16_reorder_runs():
    """``onednn_linear(bf16)`` is True exactly where oneDNN can prepack a bf16 weight: elsewhere
    (AVX2-only CPUs) the reorder raises, which is why every prepacking fast path asks first."""
    import pytest
    import torch

    from lmforge.device import onednn_linear

    if not torch.backends.mkldnn.is_available():
        assert not onednn_linear(torch.bfloat16) and not onednn_linear(torch.float32)
        return
    assert onednn_linear(torch.float32) and not onednn_linear(torch.float16)
    w = torch.randn(8, 4, dtype=torch.bfloat16)
    if onednn_linear(torch.bfloat16):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        x = torch.randn(3, 4, dtype=torch.bfloat16)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        torch.testing.assert_close(y, x @ w.T, atol=2e-2, rtol=2e-2)
    else:
        with pytest.raises(RuntimeError):
            torch.ops.mkldnn._reorder_linear_weight(w, 3)


def test_bf16_on_a_cpu_without_it_warns_once(monkeypatch, caplog):
    import logging

    import torch

    from lmforge.device import Placement, _warn_slow_bf16, cpu_has_fast_bf16

    for fast, warned in (("1", False), ("0", True)):
        monkeypatch.setenv("LMFORGE_CPU_BF16", fast)
        cpu_has_fast_bf16.cache_clear()
        _warn_slow_bf16.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lmforge"):
            assert Placement.resolve("cpu", "bf16").dtype == torch.bfloat16
            Placement.resolve("cpu", "bf16")
            Placement.resolve("cpu", "auto")
        hits = [r for r in caplog.records if "without native bf16" in r.getMessage()]
        assert len(hits) == (1 if warned else 0)
    cpu_has_fast_bf16.cache_clear()
