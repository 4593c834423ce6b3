import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lmforge.adapters import (LoraLinear, LoraSpec, ModulesToSave, apply_lora, disable_lora,
                              format_trainable, lora_state_dict, merge_lora, trainable_parameters,
                              unwrap_lora)
from lmforge.errors import LmforgeError

from ._models import build, inputs, output, randomize_adapter


# ---------------------------------------------------------------- spec
def test_spec_scale_and_validation():
    assert LoraSpec(r=4, alpha=8).scale == 2.0
    assert LoraSpec(r=4, alpha=8, use_rslora=True).scale == 4.0  # 8 / sqrt(4)
    assert LoraSpec(target_modules=("q", "v")).target_modules == ["q", "v"]
    for bad in (dict(r=0), dict(r=-2), dict(dropout=1.0), dict(dropout=-0.1), dict(target_modules=[])):
        with pytest.raises(LmforgeError):
            LoraSpec(**bad)


# ---------------------------------------------------------------- the layer
def _layer(dropout=0.0, use_rslora=False, seed=0):
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(6, 5), r=3, alpha=6.0, dropout=dropout, use_rslora=use_rslora)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    return layer


def test_init_b_zero_and_a_kaiming_bound():
    layer = LoraLinear(nn.Linear(16, 5), r=4, alpha=8)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.lora_A.weight) > 0
    # kaiming_uniform(a=sqrt(5)) bound = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(16)
    assert layer.lora_A.weight.abs().max() <= 0.25
    assert layer.lora_A.weight.dtype == torch.float32


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_matches_hand_formula(use_rslora):
    layer = _layer(use_rslora=use_rslora)
    x = torch.randn(2, 4, 6)  # (B, T, in)
    scale = 6.0 / (math.sqrt(3) if use_rslora else 3)
    w, b = layer.base.weight, layer.base.bias
    a, bb = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ w.T + b + scale * (x @ a.T @ bb.T)  # (B, T, out)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.disabled = True
    torch.testing.assert_close(layer(x), x @ w.T + b, atol=1e-6, rtol=1e-6)


def test_fast_path_vs_dropout_path():
    fast, slow = _layer(0.0), _layer(0.5)
    assert fast.lora_dropout is None and isinstance(slow.lora_dropout, nn.Dropout)
    x = torch.randn(3, 6)
    slow.eval()  # dropout is identity in eval: both paths agree
    torch.testing.assert_close(fast(x), slow(x))
    slow.train()
    torch.manual_seed(123)
    got = slow(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.5, training=True)
    expected = slow.base(x) + slow.lora_B(slow.lora_A(dropped)) * slow.scale
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, fast(x))


def test_bf16_base_with_fp32_lora_and_autocast():
    ref = _layer()
    x = torch.randn(4, 6)
    expected = ref(x)
    bf16 = _layer()
    bf16.base.to(torch.bfloat16)
    y = bf16(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and bf16.lora_A.weight.dtype == torch.float32
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ref(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.05)


class Dequantizable(nn.Module):
    """A base that is linear-like without being nn.Linear (stands in for a 4-bit base)."""

    def __init__(self, weight):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("packed", weight.clone())

    def dequantize(self):
        return self.packed

    def forward(self, x):
        return x @ self.dequantize().T


def test_linear_like_base_forward_and_merge_refused():
    w = torch.randn(5, 6)
    layer = LoraLinear(Dequantizable(w), r=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 6)
    expected = x @ w.T + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(LmforgeError, match="cannot merge into a 4-bit base; dequantise the model first"):
        layer.merge()
    assert not layer.merged
    model = nn.Sequential(nn.Linear(6, 6), Dequantizable(w))
    assert apply_lora(model, LoraSpec(r=2, target_modules=["1"])) == ["1"]
    with pytest.raises(LmforgeError, match="4-bit"):
        merge_lora(model)


def test_attribute_passthrough_to_base():
    layer = _layer()
    assert layer.weight is layer.base.weight and layer.in_features == 6


# ---------------------------------------------------------------- whole models
def test_wrapped_model_equals_base_at_step_zero():
    base, model = build("bert_cls"), build("bert_cls")
    names = apply_lora(model, LoraSpec(r=4, alpha=8, dropout=0.1, target_modules=["query", "value"]))
    assert len(names) == 4
    batch = inputs()
    assert torch.equal(output(model, batch), output(base, batch))


def test_suffix_matching():
    model = build("bert_cls")
    names = apply_lora(model, LoraSpec(target_modules=["query", "attention.output.dense"]))
    assert names == [f"bert.encoder.layer.{i}.{n}" for i in range(2)
                     for n in ("attention.self.query", "attention.output.dense")]
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, LoraLinear)
    assert isinstance(model.bert.encoder.layer[0].output.dense, nn.Linear)  # not a suffix match
    model = build("bert_cls")
    names = apply_lora(model, LoraSpec(target_modules=["dense"]))
    assert "bert.pooler.dense" in names and len(names) == 7


def test_regex_matching_fullmatch():
    model = build("llama")
    names = apply_lora(model, LoraSpec(target_modules=r".*layers\.0\.self_attn\.(q|v)_proj"))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(LmforgeError, match="matched no linear module"):
        apply_lora(build("llama"), LoraSpec(target_modules="q_proj"))  # must match the full name


def test_no_match_error_names_patterns_and_modules():
    with pytest.raises(LmforgeError) as err:
        apply_lora(build("llama"), LoraSpec(target_modules=["query", "value"]))
    msg = str(err.value)
    assert "['query', 'value']" in msg and "model.layers.0.self_attn.q_proj" in msg
    with pytest.raises(LmforgeError, match="matched no linear module"):
        apply_lora(build("bert_cls"), LoraSpec(target_modules=["LayerNorm"]))  # not linear
    with pytest.raises(LmforgeError, match="modules_to_save"):
        apply_lora(build("bert_cls"), LoraSpec(modules_to_save=["nope"]))


def test_freezing_and_apply_twice():
    model = build("bert_cls")
    apply_lora(model, LoraSpec(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"bert.encoder.layer.{i}.attention.self.query.lora_{ab}.weight"
                         for i in range(2) for ab in "AB"} | {"classifier.trained.weight",
                                                              "classifier.trained.bias"}
    assert model._lmforge_adapter.r == 4
    with pytest.raises(LmforgeError, match="already has LoRA"):
        apply_lora(model, LoraSpec(target_modules=["value"]))


def test_gradients_reach_only_adapter():
    model = build("bert_cls")
    apply_lora(model, LoraSpec(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    randomize_adapter(model)
    model(**inputs()).logits.sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert model.bert.encoder.layer[0].attention.self.query.lora_A.weight.grad.abs().sum() > 0


def test_modules_to_save_semantics():
    model = build("bert_cls")
    apply_lora(model, LoraSpec(target_modules=["query"], modules_to_save=["classifier"]))
    head = model.classifier
    assert isinstance(head, ModulesToSave)
    assert not head.original.weight.requires_grad and head.trained.weight.requires_grad
    assert head.trained.weight is not head.original.weight
    with torch.no_grad():
        head.trained.weight.add_(1.0)
    x = torch.randn(2, 32)
    torch.testing.assert_close(head(x), head.trained(x))
    assert head.weight is head.trained.weight  # attribute access follows the active copy
    with disable_lora(model):
        torch.testing.assert_close(head(x), head.original(x))


def test_disable_lora_restores_state_on_exception_and_with_merge():
    base, model = build("bert_cls"), build("bert_cls")
    apply_lora(model, LoraSpec(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    randomize_adapter(model)
    batch = inputs()
    adapted = output(model, batch)
    with pytest.raises(RuntimeError):
        with disable_lora(model):
            torch.testing.assert_close(output(model, batch), output(base, batch))
            raise RuntimeError("boom")
    torch.testing.assert_close(output(model, batch), adapted)
    merge_lora(model)
    with disable_lora(model):  # a merged update is taken out while disabled
        torch.testing.assert_close(output(model, batch), output(base, batch), atol=1e-5, rtol=1e-5)
    assert all(m.merged for m in model.modules() if isinstance(m, LoraLinear))
    torch.testing.assert_close(output(model, batch), adapted, atol=1e-5, rtol=1e-5)


def test_unwrap_returns_plain_model():
    base, model = build("bert_cls"), build("bert_cls")
    apply_lora(model, LoraSpec(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    randomize_adapter(model)
    batch = inputs()
    adapted = output(model, batch)
    plain = unwrap_lora(model)
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in plain.modules())
    assert set(plain.state_dict()) == set(base.state_dict())
    assert not hasattr(plain, "_lmforge_adapter")
    torch.testing.assert_close(output(plain, batch), adapted, atol=1e-5, rtol=1e-5)


def test_lora_state_dict_names():
    model = build("bert_cls")
    apply_lora(model, LoraSpec(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    sd = lora_state_dict(model)
    assert sorted(sd) == sorted(
        [f"base_model.model.bert.encoder.layer.{i}.attention.self.query.lora_{ab}.weight"
         for i in range(2) for ab in "AB"]
        + ["base_model.model.classifier.weight", "base_model.model.classifier.bias"])
    assert sd["base_model.model.classifier.weight"].shape == (2, 32)
    assert sd["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (4, 32)


# ---------------------------------------------------------------- parameter counts
def test_trainable_counts_by_hand():
    model = build("bert_cls")
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=["query", "value"],
                               modules_to_save=["classifier"]))
    # LoRA: 2 layers x 2 modules x (A 4x32 + B 32x4) = 1024; classifier copy 32x2 + 2 = 66.
    # Base: embeddings 100*32 + 512*32 + 2*32 + LN 64 = 19712; per layer 4*(32*32+32) + 64
    # + (32*64+64) + (64*32+32) + 64 = 8544, x2 = 17088; pooler 1056; classifier 66 -> 37922.
    d = trainable_parameters(model)
    assert d == dict(trainable=1090, total=37922 + 1090, percent=100 * 1090 / 39012)
    assert format_trainable(d) == "trainable params: 1,090 || all params: 39,012 || trainable%: 2.7940"


def test_trainable_counts_tied_weights_once():
    from transformers import LlamaForCausalLM

    from ._models import llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_lora(model, LoraSpec(r=2, target_modules=["q_proj"]))
    # embed 100*32 (shared with lm_head); per layer q 32*32, k,v 32*16, o 32*32, mlp 3*32*64,
    # 2 norms 64 -> 9280, x2; final norm 32 -> 21792. LoRA q: 2 x (2*32 + 32*2) = 256.
    assert trainable_parameters(model) == dict(trainable=256, total=21792 + 256,
                                               percent=100 * 256 / 22048)


def test_trainable_counts_match_peft():
    peft = pytest.importorskip("peft")
    ours, theirs = build("bert_cls"), build("bert_cls")
    apply_lora(ours, LoraSpec(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    pm = peft.get_peft_model(theirs, peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                     modules_to_save=["classifier"]))
    trainable, total = pm.get_nb_trainable_parameters()
    assert (trainable_parameters(ours)["trainable"], trainable_parameters(ours)["total"]) == (trainable, total)
