"""The packed frozen-base training path (lmforge.packed_train) against the plain path.

- ``frozen_linear``: output equal to ``F.linear`` on the same bf16 operands (oneDNN runs the same
  GEMM on a blocked copy: bit-identical here), input gradient within bf16 rounding, no weight
  gradient; a pack goes stale (and is rebuilt) after an in-place update, ``weight.data = other``
  and a LoRA merge.
- ``causal_attention``: equal to SDPA with the packed-sequence block mask in fp32 (1e-5), with GQA.
- A tiny Llama with LoRA, bf16 frozen base under bf16 autocast, packed rows: loss, input-embedding
  gradient and every LoRA gradient within bf16 tolerance (stated per check) of ``ENABLED = False``.
- Refusals: fp32 (bit-identical to the plain path), padding masks, eval mode, ``ENABLED = False``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge import packed_train as pt
from lmforge.adapters.lora import LoraSpec, apply_lora, merge_lora
from lmforge.device import onednn_linear

pytestmark = pytest.mark.skipif(not onednn_linear(torch.bfloat16), reason="needs oneDNN bf16 (AVX-512/AMX)")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _switch():
    default, threads = pt.PACK_BASE, torch.get_num_threads()
    pt.ENABLED = pt.PACK_BASE = True  # lever 1 is opt-in: the tests switch it on
    torch.set_num_threads(1)  # lever 2 runs at <= MAX_THREADS intra-op threads
    yield
    pt.ENABLED, pt.PACK_BASE = True, default
    torch.set_num_threads(threads)


def frozen(out_f=48, in_f=32, bias=False, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(torch.bfloat16)
    lin.weight.requires_grad_(False)
    if bias:
        lin.bias.requires_grad_(False)
    return lin.train()


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_linear_equals_f_linear_and_its_input_gradient(bias):
    lin = frozen(bias=bias)
    x = torch.randn(2, 7, 32, dtype=torch.bfloat16, requires_grad=True)
    assert pt.applies(lin, x)
    y = pt.frozen_linear(lin, x)  # (2, 7, 48)
    x2 = x.detach().clone().requires_grad_(True)
    ref = F.linear(x2, lin.weight, lin.bias)
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy)
    # dx = dy W: one bf16 rounding of an fp32-accumulated product on both sides
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-2, atol=1e-2)
    assert lin.weight.grad is None


def test_fp32_input_under_autocast_is_cast_to_bf16():
    lin = frozen()
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pt.applies(lin, x)
        y = pt.frozen_linear(lin, x)
        ref = F.linear(x, lin.weight)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_a_stale_pack_is_rebuilt_after_in_place_update_and_new_tensor():
    lin = frozen()
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    pt.frozen_linear(lin, x)
    first = pt._PACKS[lin][2]
    with torch.no_grad():
        lin.weight.mul_(-2)  # bumps the version counter
    torch.testing.assert_close(pt.frozen_linear(lin, x), F.linear(x, lin.weight), rtol=0, atol=0)
    assert pt._PACKS[lin][2] is not first
    lin.weight.data = torch.randn_like(lin.weight)  # another storage
    torch.testing.assert_close(pt.frozen_linear(lin, x), F.linear(x, lin.weight), rtol=0, atol=0)
    # what a stale pack would return: the pack of the weights before the swap differs
    assert not torch.equal(F.linear(x, lin.weight), torch.ops.mkldnn._linear_pointwise(x, first, None, "none", [], ""))


def test_refused_for_fp32_trainable_eval_hooked_and_switched_off():
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert not pt.applies(nn.Linear(32, 8), x.float())  # fp32 weight, no autocast
    lin = frozen()
    lin.weight.requires_grad_(True)
    assert not pt.applies(lin, x)  # a trained weight needs its gradient
    lin = frozen()
    assert not pt.applies(lin.eval(), x)
    lin.train().register_forward_hook(lambda *a: None)
    assert not pt.applies(lin, x)
    pt.PACK_BASE = False
    assert not pt.applies(frozen(), x)
    pt.ENABLED, pt.PACK_BASE = False, True
    assert not pt.applies(frozen(), x)


def test_segments_by_hand():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert pt.segments(pos, 1, 9) == [[(0, 3), (3, 5), (5, 9)]]
    assert pt.segments(None, 2, 4) == [[(0, 4)], [(0, 4)]]
    assert pt.segments(torch.tensor([[3, 4, 5]]), 1, 3) is None  # a continued sequence
    assert pt.segments(torch.tensor([[0, 1, 3]]), 1, 3) is None  # a gap
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(pt.allowed([[(0, 2), (2, 4)]], 4, "cpu")[0, 0], want)


@pytest.mark.parametrize("block", [3, 4, 128])
def test_causal_attention_equals_sdpa_with_the_block_mask_fp32(block):
    torch.manual_seed(0)
    spans = [[(0, 5), (5, 12), (12, 13)], [(0, 13)]]
    q = torch.randn(2, 4, 13, 8)
    k, v = torch.randn(2, 2, 13, 8), torch.randn(2, 2, 13, 8)
    got = pt.causal_attention(q, k, v, spans, 0.3, block=block)  # (B, L, H, d)
    mask = pt.allowed(spans, 13, "cpu")
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def tiny(seed: int = 0) -> LlamaForCausalLM:
    """2 layers, 4 query heads over 2 key/value heads, LoRA on every linear (B random so it
    matters), frozen base stored in bf16 as lmforge's adapter tasks do, training mode."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
            elif not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return model.train()


POS = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0]])  # 3 samples + 1 padding token
IDS = torch.arange(16)[None] * 5 % 64


def run(model, enabled: bool, pos=POS, ids=IDS, autocast=True, mask=None):
    """(hidden, d hidden/d inputs_embeds, {LoRA name: grad}) of sum(hidden * fixed weights)."""
    pt.ENABLED = enabled
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = model.model(inputs_embeds=emb if autocast else emb.to(model.dtype), position_ids=pos,
                        attention_mask=mask, use_cache=False).last_hidden_state.float()  # (1, 16, 32)
    w = torch.linspace(-1, 1, h.numel()).view_as(h)
    (h * w).sum().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return h.detach(), emb.grad.clone(), grads


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


def test_packed_rows_match_the_plain_path_within_bf16_tolerance():
    model = tiny()
    assert pt.routed(model) == 2
    plain = run(model, False)
    pt._PACKS.clear()
    fast = run(model, True)
    assert len(pt._PACKS) == 14  # every LoRA base ran packed
    assert pt._SPANS["last"][1] == [[(0, 5), (5, 12), (12, 15), (15, 16)]]  # the blocked kernel ran
    # bf16: operands rounded to 8 bits of mantissa, in another order of operations: 2 % of the
    # largest value for states and gradients (measured ~0.5 %)
    assert close(fast[0], plain[0], 2e-2)
    assert close(fast[1], plain[1], 2e-2)
    assert plain[2].keys() == fast[2].keys() and len(plain[2]) == 28
    for name in plain[2]:
        assert close(fast[2][name], plain[2][name], 3e-2), name
    # samples stay apart: changing the first sample does not move the second's states
    ids2 = IDS.clone()
    ids2[0, :5] = 1
    assert torch.equal(run(model, True, ids=ids2)[0][0, 5:12], fast[0][0, 5:12])


def test_unpacked_batches_and_the_plain_causal_mask(monkeypatch):
    model = tiny()
    plain = run(model, False, pos=None)
    # one sequence per row within one block: the plain path, bit for bit (the block loop would only
    # split SDPA's one call into one per row)
    short = run(model, True, pos=None)
    assert pt._SPANS["last"][1] == [[(0, 16)]]
    assert torch.equal(short[0], plain[0]) and torch.equal(short[1], plain[1])
    # longer than a block: the blocked kernel runs (not bit-equal to SDPA)
    monkeypatch.setattr(pt, "BLOCK", 8)
    monkeypatch.setattr(pt.causal_attention, "__defaults__", (8,))
    fast = run(model, True, pos=None)
    assert not torch.equal(fast[0], plain[0])
    assert close(fast[0], plain[0], 2e-2) and close(fast[1], plain[1], 3e-2)  # measured 1.7 % / 2.3 %


def test_padding_masks_fp32_eval_and_the_switch_keep_the_plain_path():
    model = tiny()
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[0, :3] = 0  # left padding: not the mask of the position ids
    pt._SPANS.clear()
    a, b = run(model, True, pos=None, mask=mask), run(model, False, pos=None, mask=mask)
    assert pt._SPANS["last"][1] is None
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    model32 = tiny().float()
    model32.model.layers[0].self_attn.q_proj.base.weight.requires_grad_(False)
    pt._PACKS.clear()
    a, b = run(model32, True, autocast=False), run(model32, False, autocast=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not pt._PACKS
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pt._PACKS.clear()
        pt.ENABLED = True
        on = model.model(input_ids=IDS, position_ids=POS, use_cache=False).last_hidden_state
        pt.ENABLED = False
        off = model.model(input_ids=IDS, position_ids=POS, use_cache=False).last_hidden_state
    assert torch.equal(on, off) and not pt._PACKS


def test_more_threads_than_max_threads_keep_the_plain_attention():
    model = tiny()
    torch.set_num_threads(pt.MAX_THREADS + 1)
    pt._SPANS.clear()
    a = run(model, True)
    assert "last" not in pt._SPANS  # attention not routed
    torch.set_num_threads(1)
    assert close(a[0], run(model, False)[0], 2e-2)


def test_merge_repacks_and_routing_survives_deepcopy_and_disable():
    model = tiny()
    fast = run(model, True)
    merge_lora(model)  # in-place update of every base: its packs are stale
    merged = run(model, True)
    plain = run(model, False)
    assert close(merged[0], plain[0], 2e-2) and close(merged[0], fast[0], 5e-2)
    twin = copy.deepcopy(model)
    assert pt.routed(twin) == 2
    assert twin.model.layers[0].self_attn.forward.__self__ is twin.model.layers[0].self_attn
    pt.disable(twin)
    assert pt.routed(twin) == 0 and pt.routed(model) == 2
