"""The preallocated-KV-cache decode step (kv_cache.LlamaDecoder) against the model's own forward
with transformers' DynamicCache: logits per step (fp32, GQA, left padding, sdpa and eager), the
decoding loop's tokens with the fast path on and off, prepacked bf16 weights (equal to the
unpacked step, repacked after an in-place update or a swapped tensor), LoRA (fp32: module
calls; bf16: merged into the packs), and the models the step must refuse."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from lmforge import kv_cache
from lmforge.device import onednn_linear

PACKS = onednn_linear(torch.bfloat16)  # oneDNN runs bf16 packs here (AVX-512/AMX; not on AVX2-only CPUs)
from lmforge.adapters.lora import LoraSpec, apply_lora
from lmforge.generation import GenerationConfig, _CausalSteps, decode

IDS = torch.tensor([[0, 0, 5, 9, 12, 7], [3, 8, 4, 11, 6, 2], [0, 0, 0, 0, 13, 10]])
MASK = (IDS != 0).long()


def tiny(attn: str = "sdpa", seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    """2 layers, 4 query heads over 2 key/value heads (GQA), weights spread so decoding is not trivial."""
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, attn_implementation=attn)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype)


def reference_steps(model, ids, mask, n):
    """Greedy tokens and per-step logits through the model's forward + DynamicCache."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache).logits[:, -1].float()
    out, p = [logits], pos[:, -1:]
    for _ in range(n):
        tok = out[-1].argmax(-1, keepdim=True)
        mask, p = torch.cat([mask, torch.ones_like(tok)], 1), p + 1
        out.append(model(input_ids=tok, attention_mask=mask, position_ids=p, cache=cache).logits[:, -1].float())
    return out


def decoder_steps(model, ids, mask, n, pack=True, tokens=None):
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache).logits[:, -1].float()
    dec = kv_cache.LlamaDecoder(model, cache, mask, n, pack=pack)
    out, p = [logits], pos[:, -1:]
    for i in range(n):
        tok = out[-1].argmax(-1, keepdim=True) if tokens is None else tokens[i]
        p = p + 1
        out.append(dec.step(tok, p))
    return out


def lean_steps(model, ids, mask, n, pack=True, tokens=None):
    """decoder_steps with the prompt prefilled through LlamaDecoder.feed (no model forward)."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    dec = kv_cache.LlamaDecoder(model, None, mask, n, pack=pack)
    out, p = [dec.feed(ids, mask, pos)], pos[:, -1:]
    for i in range(n):
        tok = out[-1].argmax(-1, keepdim=True) if tokens is None else tokens[i]
        p = p + 1
        out.append(dec.step(tok, p))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_decoder_logits_equal_the_models_forward(attn):
    model = tiny(attn)
    assert kv_cache.supports(model)
    want = reference_steps(model, IDS, MASK, 8)
    got = decoder_steps(model, IDS, MASK, 8)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    lean = lean_steps(model, IDS, MASK, 8)  # the prompt through feed(): its logits and cache
    for a, b in zip(lean, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert len({t for step in want for t in step.argmax(-1).tolist()}) > 3  # non-trivial decoding
    cache = DynamicCache(config=model.config)
    model(input_ids=IDS, attention_mask=MASK, cache=cache)
    dec = kv_cache.LlamaDecoder(model, cache, MASK, 1)
    dec.step(IDS[:, :1], IDS[:, :1] + 6)
    with pytest.raises(RuntimeError, match="full"):
        dec.step(IDS[:, :1], IDS[:, :1] + 7)


@torch.no_grad()
def test_decode_takes_the_fast_path_and_equals_the_plain_one():
    model = tiny()
    steps = _CausalSteps(model, IDS, MASK, GenerationConfig(max_new_tokens=4))
    steps.logits()
    assert isinstance(steps.fast, kv_cache.LlamaDecoder) and steps.cache is None
    off = _CausalSteps(model, IDS, MASK, GenerationConfig(max_new_tokens=4, fast_decode=False))
    off.logits()
    assert off.fast is None
    for cfg in (GenerationConfig(max_new_tokens=12, repetition_penalty=1.3),
                GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=20, seed=3)):
        gen = [torch.Generator().manual_seed(3) for _ in range(2)]
        fast = decode(model, IDS, MASK, cfg, eos_ids=[1], generator=gen[0])
        plain = decode(model, IDS, MASK, GenerationConfig(**{**cfg.__dict__, "fast_decode": False}), eos_ids=[1],
                       generator=gen[1])
        assert fast == plain
    hf = model.generate(IDS, attention_mask=MASK, do_sample=False, max_new_tokens=10, pad_token_id=0,
                        eos_token_id=None)[:, IDS.shape[1]:].tolist()
    assert decode(model, IDS, MASK, GenerationConfig(max_new_tokens=10)) == hf


@torch.no_grad()
def test_packed_bf16_step_equals_the_unpacked_one():
    model = tiny(dtype=torch.bfloat16)
    kv_cache.drop_packed(model)
    ref = decoder_steps(model, IDS, MASK, 6, pack=False)
    tokens = [r.argmax(-1, keepdim=True) for r in ref[:-1]]
    got = decoder_steps(model, IDS, MASK, 6, pack=True, tokens=tokens)
    # the packed path ran where oneDNN runs bf16 (AVX-512/AMX); an AVX2-only CPU keeps the plain linears
    assert bool(kv_cache.packed_linears(model).entries) == PACKS
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    assert [r.argmax(-1).tolist() for r in got] == [r.argmax(-1).tolist() for r in ref]


@torch.no_grad()
def test_packed_weights_follow_in_place_updates_and_swapped_tensors():
    model = tiny(dtype=torch.bfloat16)
    decoder_steps(model, IDS, MASK, 2)  # packs
    q = model.model.layers[0].self_attn.q_proj
    q.weight.add_(0.5)  # in place (version bump)
    got = decoder_steps(model, IDS, MASK, 3)
    want = decoder_steps(model, IDS, MASK, 3, pack=False)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    q.weight.data = q.weight.data - 1.0  # a new tensor (no version bump on the old one)
    got = decoder_steps(model, IDS, MASK, 3)
    want = decoder_steps(model, IDS, MASK, 3, pack=False)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


@torch.no_grad()
def test_lora_unmerged_and_merged():
    from lmforge.rl.fast import merged_adapters

    model = tiny()
    want_plain = decode(model, IDS, MASK, GenerationConfig(max_new_tokens=8))
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.3)
    model.eval()
    assert kv_cache.supports(model)
    off = decode(model, IDS, MASK, GenerationConfig(max_new_tokens=8, fast_decode=False))
    assert off != want_plain  # the adapter changes the output
    assert decode(model, IDS, MASK, GenerationConfig(max_new_tokens=8)) == off  # module calls: LoRA included
    model.to(torch.bfloat16)
    for p in model.parameters():
        p.data = p.data.float() if "lora" in str(p.shape) else p.data
    bf_off = decode(model, IDS, MASK, GenerationConfig(max_new_tokens=8, fast_decode=False))
    kv_cache.drop_packed(model)
    assert decode(model, IDS, MASK, GenerationConfig(max_new_tokens=8)) == bf_off
    if not PACKS:  # an AVX2-only CPU: nothing packed, nothing folded; the rest checks the packs
        assert not kv_cache.packed_linears(model).entries and not kv_cache.folds_adapters(model)
        return
    assert len(kv_cache.packed_linears(model).entries) == 2 * 4 + 1  # qkv, o, gate/up, down per layer + the head
    got = lean_steps(model, IDS, MASK, 4)  # active LoRA: W + s B A packed
    with merged_adapters(model) as folded:
        assert folded
        ref = lean_steps(model, IDS, MASK, 4, pack=False, tokens=[r.argmax(-1, keepdim=True) for r in got[:-1]])
        kv_cache.drop_packed(model)
        merged = decode(model, IDS, MASK, GenerationConfig(max_new_tokens=8))
        packed = kv_cache.packed_linears(model).entries
        assert len(packed) == 2 * 4 + 1  # the merged copies packed
    for x, y in zip(got, ref, strict=True):  # the same bf16 weights W + s B A (module calls on the merged copies)
        assert torch.equal(x, y)
    assert merged == bf_off
    assert len(kv_cache.packed_linears(model).entries) == 1  # the merged copies' packs freed, the head's kept


def test_supports_refuses_what_it_would_bypass():
    model = tiny()
    assert kv_cache.supports(model)
    assert not kv_cache.supports(nn.Linear(2, 2))
    model.train()
    assert not kv_cache.supports(model)
    model.eval()
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert not kv_cache.supports(model)
    handle.remove()
    assert kv_cache.supports(model)
    mlp = model.model.layers[0].mlp
    model.model.layers[0].mlp = nn.Sequential(mlp)
    assert not kv_cache.supports(model)
    steps = _CausalSteps(model, IDS, MASK, GenerationConfig(max_new_tokens=3))
    with torch.no_grad():
        steps.logits()
    assert steps.fast is None


def test_norm_and_rope_equal_transformers_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(64, generator=g))
        h = (torch.randn(5, 64, generator=g) * 3).to(dtype)
        tol = {"atol": 0, "rtol": 0} if dtype == torch.bfloat16 else {"atol": 1e-6, "rtol": 1e-6}
        torch.testing.assert_close(kv_cache.rms_norm(norm, h), norm(h), **tol)
        q, k = torch.randn(2, 4, 1, 16, generator=g).to(dtype), torch.randn(2, 2, 1, 16, generator=g).to(dtype)
        cos, sin = torch.randn(2, 1, 16, generator=g).to(dtype), torch.randn(2, 1, 16, generator=g).to(dtype)
        wq, wk = apply_rotary_pos_emb(q, k, cos, sin)
        signed = torch.cat((-sin[..., :8], sin[..., 8:]), -1)[:, None]
        assert torch.equal(kv_cache.rope(q, cos[:, None], signed), wq)
        assert torch.equal(kv_cache.rope(k, cos[:, None], signed), wk)


def test_shared_prefix_hand_computed():
    ids = torch.tensor([[0, 0, 4, 5, 6, 7], [4, 5, 6, 8, 9, 10], [0, 4, 5, 6, 7, 11]])
    mask = (ids != 0).long()
    assert kv_cache.shared_prefix(ids, mask) == 3  # 4 5 6
    assert kv_cache.shared_prefix(ids[[0, 2]], mask[[0, 2]]) == 3  # 4 5 6 7 is all of row 0: one kept back
    assert kv_cache.shared_prefix(ids[:1], mask[:1]) == 3


@torch.no_grad()
def test_a_shared_prefix_runs_once_and_decodes_like_the_plain_prefill():
    model = tiny()
    head = [5, 9, 12, 7, 3, 8, 4, 11, 6, 2]  # 10 shared tokens >= MIN_SHARED
    rows = [head + [13, 10, 14], head + [15], head + [16, 17]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    widths = []

    def forward(i, m, p, cache):
        widths.append(i.shape)
        return model(input_ids=i, attention_mask=m, position_ids=p, cache=cache).logits[:, -1].float()

    got, cache, full = kv_cache.prefill(forward, ids, mask, pos, DynamicCache(config=model.config))
    assert widths == [(1, 10), (3, 3)]  # the prefix once, then the rests
    assert full.tolist() == [[1] * 10 + [1, 1, 1], [1] * 10 + [0, 0, 1], [1] * 10 + [0, 1, 1]]
    want = forward(ids, mask, pos, DynamicCache(config=model.config))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    for cfg in (GenerationConfig(max_new_tokens=10), GenerationConfig(max_new_tokens=10, temperature=1.0, seed=1)):
        gen = [torch.Generator().manual_seed(1) for _ in range(2)]
        fast = decode(model, ids, mask, cfg, generator=gen[0])
        plain = decode(model, ids, mask, GenerationConfig(**{**cfg.__dict__, "fast_decode": False}), generator=gen[1])
        assert fast == plain


@torch.no_grad()
def test_repeated_prompts_are_prefilled_once():
    model = tiny()
    order = [0, 0, 1, 2, 1, 0]  # k copies, interleaved
    ids, mask = IDS[order, 2:], MASK[order, 2:]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    shapes = []

    def forward(i, m, p, cache):
        shapes.append(i.shape)
        return model(input_ids=i, attention_mask=m, position_ids=p, cache=cache).logits[:, -1].float()

    got, cache, full = kv_cache.prefill(forward, ids, mask, pos, DynamicCache(config=model.config))
    assert shapes == [(3, 4)]  # the three distinct prompts once
    assert full.tolist() == mask.tolist()
    want = forward(ids, mask, pos, DynamicCache(config=model.config))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, seed=1)
    gen = [torch.Generator().manual_seed(1) for _ in range(2)]
    fast = decode(model, ids, mask, cfg, generator=gen[0])
    assert fast == decode(model, ids, mask, GenerationConfig(**{**cfg.__dict__, "fast_decode": False}),
                          generator=gen[1])
    assert len({tuple(r) for r in fast}) > 3  # the copies sample differently


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@torch.no_grad()
def test_under_autocast_equals_the_plain_path(dtype):
    """lmforge's inference placement: bf16 parameters under bf16 autocast (packed), or fp32 ones."""
    model = tiny(dtype=dtype)
    kv_cache.drop_packed(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = decode(model, IDS, MASK, GenerationConfig(max_new_tokens=10))
        plain = decode(model, IDS, MASK, GenerationConfig(max_new_tokens=10, fast_decode=False))
    assert fast == plain
    assert bool(kv_cache.packed_linears(model).entries) == (dtype == torch.bfloat16 and PACKS)
