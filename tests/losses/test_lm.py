"""Chunked LM losses: values and gradients against the naive full-logits computation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lmforge.losses.lm import chunked_cross_entropy, sequence_logps, shift_labels, token_logps

IGN = -100


def _data(B=3, T=7, H=8, V=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGN  # a prompt
    labels[-1, -2:] = IGN  # padding
    return hidden, weight, labels


def _naive_token_logps(hidden, weight, labels, bias=None):
    logits = hidden @ weight.T  # (B, T, V)
    if bias is not None:
        logits = logits + bias
    lp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (lp * (labels != IGN)).to(hidden.dtype)  # (B, T)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor produced by any op while active."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_shift_labels_hand():
    labels = torch.tensor([[5, 6, 7, 8], [IGN, IGN, 3, 4]])
    assert shift_labels(labels).tolist() == [[6, 7, 8, IGN], [IGN, 3, 4, IGN]]
    assert shift_labels(torch.tensor([1, 2]), ignore_index=-1).tolist() == [2, -1]


def test_cross_entropy_hand_computed():
    # identity head: logits == hidden. Row 0: logits (0, ln2, ln3), label 0 -> ln(1+2+3) - 0.
    # Row 1: logits (ln4, 0, 0), label 0 -> ln(4+1+1) - ln4. Row 2 ignored.
    hidden = torch.tensor([[0.0, math.log(2), math.log(3)], [math.log(4), 0.0, 0.0], [9.0, 9.0, 9.0]])
    labels = torch.tensor([0, 0, IGN])
    want_sum = math.log(6) + math.log(6) - math.log(4)
    got = chunked_cross_entropy(hidden, torch.eye(3), labels, chunk_size=1)
    assert got.item() == pytest.approx(want_sum, abs=1e-6)
    got = chunked_cross_entropy(hidden, torch.eye(3), labels, reduction="mean")
    assert got.item() == pytest.approx(want_sum / 2, abs=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])  # 4 does not divide the 16 scored rows
@pytest.mark.parametrize("with_bias", [False, True])
def test_cross_entropy_matches_torch(reduction, chunk_size, with_bias):
    hidden, weight, labels = _data()
    bias = torch.randn(weight.shape[0], requires_grad=True) if with_bias else None
    got = chunked_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=chunk_size, reduction=reduction)
    logits = (hidden @ weight.T).view(-1, weight.shape[0])  # (N, V)
    if with_bias:
        logits = logits + bias
    want = F.cross_entropy(logits, labels.view(-1), ignore_index=IGN, reduction=reduction)
    inputs = (hidden, weight) + ((bias,) if with_bias else ())
    g_got = torch.autograd.grad(got, inputs)
    g_want = torch.autograd.grad(want, inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cross_entropy_flat_input_and_upstream_scale():
    hidden, weight, labels = _data()
    got = 3.0 * chunked_cross_entropy(hidden.view(-1, 8), weight, labels.view(-1), chunk_size=5)
    got.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = 3.0 * F.cross_entropy((hidden @ weight.T).view(-1, 11), labels.view(-1), reduction="sum")
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-5, atol=1e-5)


def test_cross_entropy_frozen_head():
    hidden, weight, labels = _data()
    frozen = weight.detach()
    loss = chunked_cross_entropy(hidden, frozen, labels, chunk_size=3, reduction="mean")
    loss.backward()
    assert frozen.grad is None
    want = F.cross_entropy((hidden @ frozen.T).view(-1, 11), labels.view(-1), reduction="mean")
    (gh,) = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(hidden.grad, gh, rtol=1e-5, atol=1e-5)


def test_cross_entropy_all_ignored_is_zero():
    hidden, weight, labels = _data()
    loss = chunked_cross_entropy(hidden, weight, torch.full_like(labels, IGN), reduction="mean")
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.abs().sum().item() == 0.0 and weight.grad.abs().sum().item() == 0.0


def test_cross_entropy_bf16_inputs():
    hidden, weight, labels = _data()
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16().requires_grad_()
    loss = chunked_cross_entropy(hb, wb, labels, chunk_size=4, reduction="mean")
    loss.backward()
    assert loss.dtype == torch.float32
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref = F.cross_entropy((hb.float() @ wb.float().T).view(-1, 11), labels.view(-1), reduction="mean")
    gh, gw = torch.autograd.grad(ref, (hb, wb))
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(hb.grad.float(), gh.float(), rtol=5e-2, atol=1e-2)
    torch.testing.assert_close(wb.grad.float(), gw.float(), rtol=5e-2, atol=1e-2)


def test_cross_entropy_under_autocast():
    hidden, weight, labels = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=4)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    want = F.cross_entropy((hidden @ weight.T).view(-1, 11), labels.view(-1), reduction="sum")
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=0.5)


def test_cross_entropy_no_grad_mode():
    hidden, weight, labels = _data()
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, weight, labels)
    want = F.cross_entropy((hidden @ weight.T).view(-1, 11), labels.view(-1), reduction="sum")
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-5)


def test_gradcheck_fp64():
    hidden, weight, labels = _data(B=2, T=5, H=4, V=6, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_cross_entropy(h, w, labels, bias=b, chunk_size=3, reduction="mean"),
        (hidden, weight, bias),
    )
    assert torch.autograd.gradcheck(
        lambda h, w, b: sequence_logps(h, w, labels, bias=b, chunk_size=3), (hidden, weight, bias)
    )


@pytest.mark.parametrize("fn", ["ce", "seq"])
def test_never_materialises_full_logits(fn):
    B, T, H, V, chunk = 4, 16, 16, 50, 16
    hidden, weight, labels = _data(B=B, T=T, H=H, V=V)
    labels[0, 0] = 1  # make sure there is more than one chunk of scored rows
    with _MaxNumel() as mode:
        if fn == "ce":
            loss = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        else:
            loss = (sequence_logps(hidden, weight, labels, chunk_size=chunk) * torch.arange(1.0, B + 1)).sum()
        loss.backward()
    # allowed: hidden-sized (N, H), weight-sized (V, H) and one (chunk, V) logits tile
    allowed = max(B * T * H, V * H, chunk * V)
    assert allowed < B * T * V
    assert mode.max_numel <= allowed


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sequence_logps_matches_naive(chunk_size, with_bias):
    hidden, weight, labels = _data()
    bias = torch.randn(weight.shape[0], requires_grad=True) if with_bias else None
    upstream = torch.tensor([0.5, -2.0, 1.5])  # distinct per-sequence gradients (as in DPO)
    got, counts = sequence_logps(hidden, weight, labels, bias=bias, chunk_size=chunk_size, return_counts=True)
    want = _naive_token_logps(hidden, weight, labels, bias).sum(-1)
    inputs = (hidden, weight) + ((bias,) if with_bias else ())
    g_got = torch.autograd.grad(got, inputs, upstream)
    g_want = torch.autograd.grad(want, inputs, upstream)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert counts.tolist() == [4, 7, 5]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sequence_logps_hand_computed():
    # identity head, one sequence: position 0 logits (0, ln 3) label 1 -> ln(3/4);
    # position 1 ignored; position 2 logits (0, 0) label 0 -> ln(1/2).
    hidden = torch.tensor([[[0.0, math.log(3)], [5.0, 5.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, IGN, 0]])
    logps, counts = sequence_logps(hidden, torch.eye(2), labels, return_counts=True)
    assert logps.item() == pytest.approx(math.log(3 / 4) + math.log(1 / 2), abs=1e-6)
    assert counts.tolist() == [2]


def test_sequence_logps_frozen_head_and_token_logps():
    hidden, weight, labels = _data()
    frozen = weight.detach()
    per_token = token_logps(hidden, frozen, labels, chunk_size=2)
    assert per_token.shape == labels.shape
    assert (per_token[labels == IGN] == 0).all()
    torch.testing.assert_close(per_token, _naive_token_logps(hidden, frozen, labels), rtol=1e-5, atol=1e-5)
    sequence_logps(hidden, frozen, labels).sum().backward()
    assert frozen.grad is None
    (want,) = torch.autograd.grad(_naive_token_logps(hidden, frozen, labels).sum(), hidden)
    torch.testing.assert_close(hidden.grad, want, rtol=1e-5, atol=1e-5)


def test_sequence_logps_bf16_hidden():
    hidden, weight, labels = _data()
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16()
    logps = sequence_logps(hb, wb, labels)
    logps.sum().backward()
    assert logps.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16
    want = _naive_token_logps(hb.detach().float(), wb.float(), labels).sum(-1)
    torch.testing.assert_close(logps, want, rtol=2e-2, atol=0.2)


def test_shape_mismatch_raises():
    hidden, weight, labels = _data()
    with pytest.raises(ValueError):
        chunked_cross_entropy(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError):
        chunked_cross_entropy(hidden, weight, labels, reduction="none")
