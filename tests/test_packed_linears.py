"""packed_linears: oneDNN-packed bf16 groups written in place, LoRA merged into the pack.

The layout read off probe packs must reproduce ``_reorder_linear_weight`` exactly (a pack
rewritten in place computes what a fresh pack of the new weight computes, bit for bit); a group
with an active LoRA layer computes the merged weight ``W + s B A`` (bf16) and follows in-place
updates of A, B or W and swapped tensors, reusing its buffer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge import packed_linears as P
from lmforge.device import onednn_linear
from lmforge.adapters.lora import LoraSpec, apply_lora

pytestmark = pytest.mark.skipif(not (onednn_linear(torch.bfloat16) and hasattr(torch.ops.mkldnn, "data_ptr")),
                                reason="no oneDNN bf16 packing (it needs AVX-512 or AMX)")
OP = torch.ops.mkldnn._linear_pointwise.default


def run(packed, x):
    return OP(x, packed, None, "none", [], "")


@pytest.mark.parametrize("shape", [(64, 32), (128, 64), (192, 96)])
def test_layout_rewrites_a_pack_bit_for_bit(shape):
    g = torch.Generator().manual_seed(0)
    w0, w1 = (torch.randn(shape, generator=g).bfloat16() for _ in range(2))
    x = torch.randn(5, shape[1], generator=g).bfloat16()
    layout = P.blocked_layout(shape[0], shape[1], 5)
    assert layout is not None
    packed = torch.ops.mkldnn._reorder_linear_weight(w0, 5)
    P._write_packed(P._buffer(packed), w1, layout)
    assert torch.equal(run(packed, x), run(torch.ops.mkldnn._reorder_linear_weight(w1, 5), x))
    assert torch.equal(run(packed, x), nn.functional.linear(x, w1))
    assert not torch.equal(run(packed, x), nn.functional.linear(x, w0))


def test_padded_layouts_are_refused():
    """40 rows: on AVX512-BF16 oneDNN pads them to its 64-row block (None: no in-place rewrite of a
    padded buffer); where it packs them unpadded (AVX-512 without BF16: a transposed copy) the
    layout must rewrite that pack bit for bit."""
    w0, w1 = torch.randn(40, 32).bfloat16(), torch.randn(40, 32).bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(w0, 3)
    layout = P.blocked_layout(40, 32, 3)
    if torch.ops.mkldnn._nbytes(packed) != 2 * w0.numel():
        assert layout is None
        return
    assert layout is not None
    x = torch.randn(3, 32).bfloat16()
    P._write_packed(P._buffer(packed), w1, layout)
    assert torch.equal(run(packed, x), run(torch.ops.mkldnn._reorder_linear_weight(w1, 3), x))


def lora_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Module()
    model.q_proj, model.k_proj = nn.Linear(64, 128, bias=False), nn.Linear(64, 64, bias=False)
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=["q_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, 0, 0.3)
    return model.eval()


def merged_reference(model, x):
    q, k = model.q_proj, model.k_proj
    w = torch.addmm(q.base.weight, q.lora_B.weight.bfloat16(), q.lora_A.weight.bfloat16(), alpha=q.scale)
    return torch.cat([nn.functional.linear(x, w), nn.functional.linear(x, k.weight)], -1)


@torch.no_grad()
def test_lora_group_is_merged_and_follows_updates_in_place():
    model = lora_model()
    for n, p in model.named_parameters():
        if "lora" not in n:
            p.data = p.data.bfloat16()
    x = torch.randn(3, 64).bfloat16()
    packs = P.PackedLinears()
    mods = (model.q_proj, model.k_proj)
    f = packs.projection(mods, 3, torch.bfloat16, torch.device("cpu"))
    assert torch.equal(f(x), merged_reference(model, x))
    assert not torch.equal(f(x), torch.cat([model.q_proj.base(x), model.k_proj(x)], -1))  # the update is in
    entry = next(iter(packs.entries.values()))
    buf = entry.packed
    model.q_proj.lora_A.weight.add_(0.25)  # an optimizer step: in place, version bumped
    f = packs.projection(mods, 3, torch.bfloat16, torch.device("cpu"))
    assert torch.equal(f(x), merged_reference(model, x))
    model.q_proj.lora_B.weight.data = model.q_proj.lora_B.weight.data * -2  # a swapped tensor
    model.k_proj.weight.mul_(0.5)
    f = packs.projection(mods, 3, torch.bfloat16, torch.device("cpu"))
    assert torch.equal(f(x), merged_reference(model, x))
    assert next(iter(packs.entries.values())).packed is buf  # rewritten, not packed anew
    model.q_proj.disabled = True  # adapters off: the base alone, packed again
    f = packs.projection(mods, 3, torch.bfloat16, torch.device("cpu"))
    assert torch.equal(f(x), torch.cat([model.q_proj.base(x), model.k_proj(x)], -1))
