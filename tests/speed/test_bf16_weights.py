"""bf16-stored linear weights applied in fp32 (lmforge.bf16_weights, cpu_kernels.linear_bf16w):
the C kernel and the wide-input path against ``x @ W.float().T + b`` (shapes with tails, column
slices of a wider output, 1 and 2 threads), the layer conversion (tied head, LoRA weights left
alone, memory-mapped checkpoints), the decoder's grouped projections, greedy decoding against a
model whose weights are rounded to bf16 and kept fp32, and the placement that picks it."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from lmforge import bf16_weights, cpu_kernels, kv_cache
from lmforge.bf16_weights import Bf16Linear, project, store_bf16_weights
from lmforge.device import Placement
from lmforge.generation import GenerationConfig, decode
from test_kv_cache import tiny

C = cpu_kernels.library() is not None
needs_c = pytest.mark.skipif(not C, reason="no C compiler: the kernel is not built")


def _ref(x, w, b=None):
    return torch.nn.functional.linear(x, w.float(), b)


@needs_c
@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize("k,n", [(16, 4), (20, 3), (77, 33), (64, 1), (130, 7)])
def test_kernel_equals_widened_fp32_linear(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g)
    for bias in (None, b):
        y = cpu_kernels.linear_bf16w(x, w, bias)
        torch.testing.assert_close(y, _ref(x, w, bias), rtol=1e-5, atol=1e-5)


@needs_c
def test_kernel_writes_a_column_slice_and_splits_over_threads_exactly():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(6, 96, generator=g), torch.randn(37, 96, generator=g).bfloat16(), torch.randn(37, generator=g)
    wide = torch.full((6, 50), 7.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.linear_bf16w(x, w, b)
        torch.set_num_threads(2)
        cpu_kernels.linear_bf16w(x, w, b, out=wide[:, 5:42])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(wide[:, 5:42], one)  # the same per-column arithmetic on either thread
    assert (wide[:, :5] == 7).all() and (wide[:, 42:] == 7).all()  # nothing outside the slice
    with pytest.raises(ValueError):
        cpu_kernels.linear_bf16w(x, w, b, out=torch.empty(6, 36))


def test_kernel_declines_what_it_does_not_compute():
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    assert cpu_kernels.linear_bf16w(x, w) is None  # fp32 weights
    assert cpu_kernels.linear_bf16w(x.t(), w.bfloat16()[:, :2]) is None  # strided input
    assert cpu_kernels.linear_bf16w(x.requires_grad_(), w.bfloat16()) is None


@pytest.mark.parametrize("m", [2, 17, 40, 70, 129])  # the kernel up to ROWS_KERNEL (64), widened chunks above
def test_project_small_and_wide_inputs(m, monkeypatch):
    monkeypatch.setattr(bf16_weights, "SCRATCH_ELEMS", 5 * 24)  # several widened chunks of 5 rows
    g = torch.Generator().manual_seed(m)
    x, w, b = torch.randn(m, 24, generator=g), torch.randn(23, 24, generator=g).bfloat16(), torch.randn(23, generator=g)
    torch.testing.assert_close(project(x, w, b), _ref(x, w, b), rtol=1e-5, atol=1e-5)
    out = torch.zeros(m, 30)
    project(x, w, b, out[:, 3:26])
    torch.testing.assert_close(out[:, 3:26], _ref(x, w, b), rtol=1e-5, atol=1e-5)
    assert (out[:, :3] == 0).all() and (out[:, 26:] == 0).all()


def test_bf16_linear_forward_dtypes_and_gradients():
    lin = nn.Linear(12, 5)
    ref = nn.Linear(12, 5)
    ref.load_state_dict(lin.state_dict())
    with torch.no_grad():
        ref.weight.copy_(ref.weight.bfloat16().float())
    model = nn.Sequential(lin)
    assert store_bf16_weights(model) == 1 and type(lin) is Bf16Linear and lin.weight.dtype == torch.bfloat16
    x = torch.randn(3, 4, 12)
    torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-5)  # 3-D input, rows flattened
    assert lin(x.bfloat16()).dtype == torch.bfloat16
    xg = torch.randn(2, 12, requires_grad=True)
    lin(xg).sum().backward()  # an input that needs a gradient still gets one
    torch.testing.assert_close(xg.grad, ref.weight.sum(0).expand(2, 12), rtol=1e-5, atol=1e-5)


def _tiny(seed=0):
    return tiny(seed=seed)  # test_kv_cache's 2-layer GQA Llama with spread weights


def _rounded(model):
    """The reference: every linear weight rounded to bf16 and kept fp32 (an untied head)."""
    ref = _tiny()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.lm_head.weight = nn.Parameter(ref.lm_head.weight.detach().clone())
        for m in ref.modules():
            if type(m) is nn.Linear:
                m.weight.copy_(m.weight.bfloat16().float())
    return ref


def test_conversion_keeps_the_embedding_and_gives_a_tied_head_its_own_copy():
    model = _tiny()
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb
    assert store_bf16_weights(model) == 2 * 7 + 1
    assert model.model.embed_tokens.weight is emb and emb.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, emb.detach().bfloat16())
    assert all(not p.requires_grad for m in model.modules() if type(m) is Bf16Linear for p in m.parameters())


def test_conversion_leaves_lora_weights_fp32():
    from lmforge.adapters.lora import LoraSpec, apply_lora

    model = _tiny()
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    n = store_bf16_weights(model)
    assert n == 2 * 7 + 1  # the LoRA layers' bases, not their A/B
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32, name


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_decoding_equals_a_model_with_bf16_rounded_weights(attn):
    model = _tiny()
    model.config._attn_implementation = attn
    ref = _rounded(model)
    ref.config._attn_implementation = attn
    store_bf16_weights(model)
    ids = torch.tensor([[0, 0, 5, 9, 12, 7], [3, 8, 4, 11, 6, 2], [0, 0, 0, 0, 13, 10]])
    mask = (ids != 0).long()
    assert kv_cache.supports(model)
    # the decoder's step (grouped projections into one output) against the reference forward, per step
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    dec = kv_cache.LlamaDecoder(model, None, mask, 6)
    got = dec.feed(ids, mask, pos)
    want = ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    cfg = GenerationConfig(max_new_tokens=8)
    assert decode(model, ids, mask, cfg) == decode(ref, ids, mask, cfg)


def test_placement_auto_on_an_fp32_cpu_stores_bf16_weights_and_fp32_does_not():
    auto, fp32 = Placement.resolve("cpu", "auto"), Placement.resolve("cpu", "fp32")
    assert fp32.bf16_weights is False and fp32.for_inference(_tiny()) == 0
    assert auto.bf16_weights is (auto.dtype == torch.float32)
    if auto.bf16_weights and C:
        model = _tiny()
        assert auto.for_inference(model) == 15 and model.lm_head.weight.dtype == torch.bfloat16


@torch.no_grad()
def test_a_memory_mapped_checkpoint_converts_without_corrupting_what_is_kept(tmp_path):
    """The conversion returns the pages of the dropped fp32 weights to the OS (madvise): the kept
    tensors (embedding, norms) of the same file mapping must read back intact."""
    src = _tiny(seed=3)
    src.save_pretrained(tmp_path, safe_serialization=True)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref = _rounded(model)
    store_bf16_weights(model)
    for (name, p), q in zip(src.named_parameters(), model.parameters()):
        if q.dtype == torch.float32:
            assert torch.equal(p, q), name
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_decoding_with_an_active_lora_adapter():
    from lmforge.adapters.lora import LoraSpec, apply_lora

    model = _tiny(seed=5)
    ref = _rounded(model)
    for m in (model, ref):
        torch.manual_seed(9)
        apply_lora(m, LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
        m.eval()
    store_bf16_weights(model)
    ids = torch.tensor([[0, 4, 9, 12, 7], [3, 8, 4, 11, 6]])
    mask = (ids != 0).long()
    cfg = GenerationConfig(max_new_tokens=6)
    assert decode(model, ids, mask, cfg) == decode(ref, ids, mask, cfg)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits,
                               rtol=1e-4, atol=1e-4)
