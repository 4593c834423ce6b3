"""Unpadded encoder batches (lmforge.unpad) against the plain padded path."""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, LlamaConfig, LlamaModel

from lmforge.adapters.lora import LoraSpec, apply_lora
from lmforge.unpad import (can_unpad, disable_unpadding, enable_unpadding, is_unpadded, unpad_layout,
                           varlen_attention)


def _bert(impl="eager", cls=BertForSequenceClassification, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return cls._from_config(cfg, attn_implementation=impl).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (4, 9), generator=g)
    mask = torch.zeros(4, 9, dtype=torch.long)
    for b, n in enumerate([9, 5, 2, 7]):
        mask[b, :n] = 1
    tt = torch.zeros_like(ids)
    tt[0, 5:] = 1
    return ids * mask, mask, tt


def test_layout_by_hand():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    flat, pos, cu, longest = unpad_layout(mask)
    assert flat.tolist() == [0, 1, 2, 3, 6, 7]
    assert pos.tolist() == [0, 1, 2, 0, 0, 1]
    assert cu.tolist() == [0, 3, 4, 6] and longest == 3


def test_varlen_attention_equals_block_diagonal_attention():
    """Per-sequence attention of a packed row == full attention with a block-diagonal mask."""
    from lmforge.unpad import eager_attention as eager_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    cu = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    seg = torch.tensor([0, 0, 0, 1, 2, 2])
    block = torch.where(seg[:, None] == seg[None, :], 0.0, float("-inf"))  # (N, N)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + block, -1) @ v  # (1, H, N, d)
    mod = torch.nn.Module()
    out = varlen_attention(eager_attention_forward, mod, q, k, v, cu, 3, scaling=0.5)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_eager_attention_equals_transformers_eager():
    """Our eager kernel (its dropout from lmforge.fast_dropout) == transformers' BERT eager, no dropout."""
    from transformers.models.bert.modeling_bert import eager_attention_forward

    from lmforge.unpad import eager_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 5).masked_fill(torch.tensor([True, True, True, False, False]), -1e9)
    mod = torch.nn.Module().eval()
    for a, b in zip(eager_attention(mod, q, k, v, mask, scaling=0.3, dropout=0.1),
                    eager_attention_forward(mod, q, k, v, mask, scaling=0.3, dropout=0.1)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_eager_attention_under_bf16_autocast_matches_transformers_within_bf16():
    """Weights kept in bf16 (softmax accumulating in fp32) vs autocast's fp32 softmax: outputs and
    gradients agree to bf16 precision."""
    from transformers.models.bert.modeling_bert import eager_attention_forward

    from lmforge.unpad import eager_attention

    torch.manual_seed(0)
    base = [torch.randn(4, 3, 17, 8) for _ in range(3)]
    mask = torch.zeros(4, 1, 1, 17)
    mask[1, ..., 9:] = torch.finfo(torch.float32).min
    mod = torch.nn.Module().eval()
    outs, grads = [], []
    for fn in (eager_attention, eager_attention_forward):
        qkv = [x.bfloat16().requires_grad_() for x in base]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(mod, *qkv, mask, scaling=0.35)[0]
        out.float().square().sum().backward()
        outs.append(out.float())
        grads.append([x.grad.float() for x in qkv])
    torch.testing.assert_close(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
        assert (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_unpadded_classifier_matches_padded_fp32(impl):
    model = _bert(impl)
    ids, mask, tt = _batch()
    ref = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
    ref_h = model.bert(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    assert enable_unpadding(model) and is_unpadded(model)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
    h = model.bert(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h * mask[..., None], ref_h * mask[..., None], atol=1e-5, rtol=1e-5)
    assert h.shape == ref_h.shape and not h[mask == 0].any()  # re-padded with zeros
    disable_unpadding(model)
    assert model.config._attn_implementation == impl and not is_unpadded(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits, ref)


def test_unpadded_lora_gradients_match_padded():
    grads = []
    for unpad in (False, True):
        model = _bert("eager").train()
        apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=["query", "value"]))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        if unpad:
            enable_unpadding(model)
        ids, mask, tt = _batch()
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits,
                                                 torch.tensor([0, 1, 2, 1]))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)


def test_unpadded_bf16_autocast_within_tolerance():
    model = _bert("eager", BertModel)
    ids, mask, tt = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids, attention_mask=mask).last_hidden_state.float()
        enable_unpadding(model)
        out = model(ids, attention_mask=mask).last_hidden_state.float()
    m = mask[..., None]
    assert ((out - ref) * m).abs().max() < 0.05 * ref.abs().max()


def test_plain_path_when_nothing_to_unpad_or_left_padded():
    model = _bert("sdpa", BertModel)
    ids, _, _ = _batch()
    left = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]] * 4)
    full = torch.ones(4, 9, dtype=torch.long)
    ref = [model(ids, attention_mask=m).last_hidden_state for m in (left, full)]
    enable_unpadding(model)
    for m, r in zip((left, full), ref):
        torch.testing.assert_close(model(ids, attention_mask=m).last_hidden_state, r)


def test_causal_models_are_not_unpadded():
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaModel._from_config(cfg, attn_implementation="sdpa")
    assert not can_unpad(model) and not enable_unpadding(model)
    assert model.config._attn_implementation == "sdpa"


def test_kernel_switch_keeps_unpadding():
    """set_attn_implementation while unpadded (SetFit switches to eager for training) stays unpadded."""
    model = _bert("sdpa", BertModel)
    ids, mask, _ = _batch()
    ref = model(ids, attention_mask=mask).last_hidden_state
    enable_unpadding(model)
    model.set_attn_implementation("eager")
    out = model(ids, attention_mask=mask).last_hidden_state
    assert model.config._attn_implementation == "lmforge_unpad_eager" and not out[mask == 0].any()
    torch.testing.assert_close(out * mask[..., None], ref * mask[..., None], atol=1e-5, rtol=1e-5)


def test_deepcopy_keeps_unpadding_on_the_copy():
    import copy

    model = _bert("sdpa")
    enable_unpadding(model)
    twin = copy.deepcopy(model)
    assert is_unpadded(twin) and twin.bert.forward.__self__ is twin.bert
    ids, mask, tt = _batch()
    torch.testing.assert_close(twin(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits)


def test_prompt_tuning_on_an_unpadded_model_matches_plain():
    """Prompt tuning's hook binds the backbone's real signature and passes ``inputs_embeds`` with N
    virtual tokens prepended (N ones in the mask): those batches run unpadded too (zeros at the
    padding positions prove it), with the logits and the prompt's gradient of the plain path."""
    import inspect

    from lmforge.adapters import apply_adapter
    from lmforge.adapters.prompt import PromptSpec

    outs, grads, states = [], [], []
    for unpad in (False, True):
        model = _bert("eager")
        if unpad:
            enable_unpadding(model)
            assert "input_ids" in inspect.signature(model.bert.forward).parameters
        torch.manual_seed(3)
        apply_adapter(model, PromptSpec(num_virtual_tokens=3, init="random"))
        ids, mask, tt = _batch()
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        logits.square().sum().backward()
        outs.append(logits)
        grads.append(model.lmforge_prompt.embedding.weight.grad)
        states.append(model.bert(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)
    assert states[1].shape == states[0].shape == (4, 9, 32)
    pad = _batch()[1] == 0
    assert states[0][pad].abs().sum() > 0 and not states[1][pad].any()  # unpadded: nothing at padding
    torch.testing.assert_close(states[1][~pad], states[0][~pad], atol=1e-5, rtol=1e-5)


def test_inputs_embeds_are_unpadded_like_input_ids():
    model = _bert("sdpa", BertModel)
    ids, mask, tt = _batch()
    ref = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    enable_unpadding(model)
    embeds = model.get_input_embeddings()(ids)
    out = model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=tt).last_hidden_state
    keep = mask.bool()
    assert not out[~keep].any()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)


def test_little_padding_takes_the_plain_path():
    """Below MIN_PADDING the gathers cost more than the padding: padding states stay computed."""
    from lmforge import unpad

    model = _bert("eager", BertModel)
    enable_unpadding(model)
    ids = torch.randint(1, 50, (4, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(4, 20, dtype=torch.long)
    mask[3, 19] = 0  # 1 padding token in 80
    assert unpad.MIN_PADDING > 1 / 80
    h = model(ids, attention_mask=mask).last_hidden_state
    assert h[3, 19].abs().sum() > 0  # the plain path computes the padding position
    mask[3, 10:] = 0  # 10 in 80 = 12.5%
    h = model(ids, attention_mask=mask).last_hidden_state
    assert not h[3, 10:].any()  # unpadded: zeros at padding
