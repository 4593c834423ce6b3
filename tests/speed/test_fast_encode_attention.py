"""Eager attention groups of lmforge.fast_encode_attention (_Eager): gather/scatter indices by hand, and the
padded-key kernel against plain per-sequence attention."""
import pytest
import torch

from lmforge.fast_encode_attention import KEY_BLOCK, KEY_TAIL, _Eager, _groups, _key_cols


def test_key_cols_by_hand():
    assert (KEY_BLOCK, KEY_TAIL) == (32, 4)
    assert [_key_cols(m) for m in (1, 4, 20, 32, 33, 36, 37, 70, 256, 260, 261)] == \
        [32, 32, 32, 32, 33, 36, 64, 96, 256, 260, 288]


def test_indices_by_hand():
    """Two sequences of 2 and 1 tokens, one head: rows of the (n_g * 3 * H, d) view of qkv are
    ``3 r + j`` (row r, j = q/k/v); padded slots repeat the sequence's last row."""
    g = _Eager.make([0, 2, 3], heads=1, dtype=torch.float32, device="cpu")
    assert (g.c, g.m, g.mk) == (2, 2, 32)
    q = [0, 3, 6, 6]  # seq 0: rows 0, 1; seq 1: row 2, then its last row again
    k = [1, 4] + [4] * 30 + [7] * 32
    v = [2, 5] + [5] * 30 + [8] * 32
    assert g.gather.tolist() == q + k + v
    assert g.scatter.tolist() == [0, 1, 2]  # (b * H + h) * m + t for (0, 0), (0, 1), (1, 0)
    assert g.bias.shape == (2, 1, 32)
    assert (g.bias[0, 0, :2] == 0).all() and (g.bias[0, 0, 2:] == torch.finfo(torch.float32).min).all()
    assert (g.bias[1, 0, :1] == 0).all() and (g.bias[1, 0, 1:] == torch.finfo(torch.float32).min).all()
    one = _Eager.make([5, 37], heads=3, dtype=torch.float32, device="cpu")  # 32 tokens: a permute copy
    assert one.gather is None and one.bias is None and (one.m, one.mk) == (32, 32)


def _reference(qkv, cu, h, d):
    """softmax(q_b k_b^T / sqrt(d)) v_b per sequence and head, fp64."""
    out = torch.empty(qkv.shape[0], h * d, dtype=torch.float64)
    for s, e in zip(cu[:-1], cu[1:]):
        blk = qkv[s:e].double().view(e - s, 3, h, d)
        q, k, v = (blk[:, i].transpose(0, 1) for i in range(3))  # (H, L, d)
        w = torch.softmax(q @ k.transpose(1, 2) / d ** 0.5, -1)
        out[s:e] = (w @ v).transpose(0, 1).reshape(e - s, h * d)
    return out


@pytest.mark.parametrize("budget", [None, 1, 2 * 40 * 40])
def test_groups_equal_per_sequence_attention(budget):
    """Lengths around the key block (1, 7, 31, 32, 33, 40): one group of all, one group per
    sequence, and a mix; fp32 within 1e-5 of per-sequence fp64 attention."""
    torch.manual_seed(0)
    h, d = 2, 4
    lens = [32, 40, 1, 7, 33, 31, 32, 70]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    qkv = torch.randn(cu[-1], 3 * h * d) * 2
    out = torch.full((cu[-1], h * d), float("nan"))
    groups = [_Eager.make(cu[g0:g1 + 1], h, torch.float32, "cpu") for g0, g1 in _groups(cu, h, budget)]
    want = {None: 1, 1: len(lens)}.get(budget)
    assert len(groups) == want if want else 1 < len(groups) < len(lens)
    bufs = _Eager.buffers(groups, h, d, qkv)
    for g in groups:
        g.run(qkv, out, bufs, h, d, d ** -0.5)
    torch.testing.assert_close(out.double(), _reference(qkv, cu, h, d), atol=1e-5, rtol=1e-5)


def test_bf16_groups_close_to_reference():
    torch.manual_seed(1)
    h, d, cu = 4, 8, [0, 20, 37, 38, 70]
    qkv = torch.randn(cu[-1], 3 * h * d).bfloat16()
    out = torch.empty(cu[-1], h * d, dtype=torch.bfloat16)
    g = _Eager.make(cu, h, torch.bfloat16, "cpu")
    g.run(qkv, out, _Eager.buffers([g], h, d, qkv), h, d, d ** -0.5)
    ref = _reference(qkv, cu, h, d)
    assert (out.double() - ref).abs().max() < 0.03
