"""Logit lens, next-token probabilities, attention and KV timing on tiny random models of three
decoder families (Llama, GPT-2, Gemma 3 with logit soft-capping) and a tiny BERT masked LM."""
from __future__ import annotations

import pytest
import torch
from conftest import build_word_tokenizer

from lmforge.errors import LmforgeError
from lmforge.inspection import lens


def _decoders(vocab_size: int) -> dict:
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    return {
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                           bos_token_id=2, eos_token_id=3)),
        "gemma3": Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                                     head_dim=8, final_logit_softcapping=5.0)),
    }


@pytest.fixture(scope="module")
def setup():
    tok, vocab = build_word_tokenizer("llama")
    models = {k: m.eval() for k, m in _decoders(len(vocab)).items()}
    ids = tok("the movie was very good and the plot", return_tensors="pt")["input_ids"]  # (1, T)
    return tok, models, ids


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3"])
def test_last_layer_lens_equals_model_output(setup, name):
    tok, models, ids = setup
    model = models[name]
    res = lens.logit_lens(model, tok, ids, k=3)
    assert len(res.top) == model.config.num_hidden_layers + 1
    assert res.max_diff < 1e-5
    with torch.no_grad():
        own = torch.softmax(model(input_ids=ids).logits[0].float(), -1)  # (T, V)
    assert [row[0]["id"] for row in res.top[-1]] == own.argmax(-1).tolist() == res.final_ids
    assert [row[0]["prob"] for row in res.top[-1]] == pytest.approx(own.max(-1).values.tolist(), abs=1e-6)
    assert all(r == 0 for r in res.final_rank[-1])


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3"])
def test_intermediate_states_match_transformers_hidden_states(setup, name):
    """Parity with transformers' own ``output_hidden_states``: entries 0..L-1 are the raw residual
    stream, the last one is after the final norm, so norm(our h_L) must equal it."""
    _, models, ids = setup
    model = models[name]
    parts = lens.decoder_parts(model)
    states, _ = lens.residual_states(model, parts.layers, ids)
    with torch.no_grad():
        hf = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(states) == len(hf)
    for ours, theirs in zip(states[:-1], hf[:-1]):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(parts.norm(states[-1]), hf[-1])


def test_softcapping_is_applied_for_gemma(setup):
    _, models, ids = setup
    parts = lens.decoder_parts(models["gemma3"])
    assert parts.cap == 5.0
    h = torch.randn(2, 32)
    capped = lens.lens_logits(parts, h)
    assert capped.abs().max() <= 5.0
    raw = parts.head(parts.norm(h))
    torch.testing.assert_close(capped, 5.0 * torch.tanh(raw / 5.0))


def test_decoder_parts_find_the_final_norm(setup):
    _, models, _ = setup
    assert lens.decoder_parts(models["llama"]).norm is models["llama"].model.norm
    assert lens.decoder_parts(models["gpt2"]).norm is models["gpt2"].transformer.ln_f
    assert lens.decoder_parts(models["gpt2"]).head is models["gpt2"].lm_head


def test_next_token_probs_sum_to_one_and_temperature_by_hand():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = lens.next_token_probs(z)
    torch.testing.assert_close(p.sum(-1), torch.ones(1))
    e = torch.exp(torch.tensor([2.0, 1.0, 0.0, -1.0]) / 0.5)
    torch.testing.assert_close(lens.next_token_probs(z, 0.5)[0], e / e.sum())
    with pytest.raises(LmforgeError, match="temperature"):
        lens.next_token_probs(z, 0.0)


def test_greedy_steps_match_transformers_generate(setup):
    tok, models, ids = setup
    model = models["llama"]
    steps = lens.greedy_steps(model, tok, ids, steps=4, k=5, temperature=0.5)
    ref = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4,
                         pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert [s.chosen["id"] for s in steps] == ref
    for s in steps:
        assert s.top[0] == s.chosen and len(s.top) == 5
        assert sum(t["prob"] for t in s.top) <= 1.0 + 1e-6
        assert s.top_t[0]["prob"] >= s.top[0]["prob"]  # T < 1 sharpens
        assert s.entropy > 0


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3"])
def test_attention_rows_sum_to_one_and_are_causal(setup, name):
    _, models, ids = setup
    kernel = models[name].config._attn_implementation
    w = lens.attention(models[name], ids, layer=-1, head=1)  # (T, T)
    assert models[name].config._attn_implementation == kernel  # restored
    T = ids.shape[1]
    assert w.shape == (T, T)
    torch.testing.assert_close(w.sum(-1), torch.ones(T))
    assert float(torch.triu(w, diagonal=1).abs().max()) == 0.0


def test_layer_and_head_out_of_range(setup):
    _, models, ids = setup
    with pytest.raises(LmforgeError, match="--layer 3 is out of range.*3 layers"):
        lens.attention(models["llama"], ids, layer=3, head=0)
    with pytest.raises(LmforgeError, match="--head 4 is out of range"):
        lens.attention(models["llama"], ids, layer=0, head=4)
    assert lens.check_layer_head(3, 4, -1, -4) == (2, 0)


def test_kv_timing_same_tokens(setup):
    _, models, ids = setup
    t = lens.kv_timing(models["llama"], ids, new_tokens=4)
    assert len(t.cached_ms) == len(t.uncached_ms) == 4 and t.same_tokens
    s = t.summary()
    assert s["tokens"] == 4 and s["cached_ms_per_token"] > 0 and s["speedup"] > 0


def test_encoder_does_not_pass_as_decoder():
    from transformers import BertConfig, BertModel

    m = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32))
    with pytest.raises(LmforgeError, match="no LM head"):
        lens.decoder_parts(m)


def test_mask_fills_per_layer_last_equals_model():
    from transformers import BertConfig, BertForMaskedLM

    tok, vocab = build_word_tokenizer("bert")
    torch.manual_seed(1)
    model = BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64)).eval()
    where, fills = lens.mask_fills_per_layer(model, tok, "the [MASK] was [MASK] good", k=4)
    assert where == [2, 4] and len(fills) == 3 and all(len(f) == 2 for f in fills)
    enc = tok("the [MASK] was [MASK] good", return_tensors="pt")
    with torch.no_grad():
        own = torch.softmax(model(**enc).logits[0], -1)  # (T, V)
        # layer 1's readout = the MLM head applied to block 0's output
        h1 = model(**enc, output_hidden_states=True).hidden_states[1]
        l1 = torch.softmax(model.cls(h1)[0], -1)
    for j, pos in enumerate(where):
        top = own[pos].topk(4)
        assert [f["id"] for f in fills[-1][j]] == top.indices.tolist()
        assert [f["prob"] for f in fills[-1][j]] == pytest.approx(top.values.tolist(), abs=1e-6)
        assert [f["id"] for f in fills[1][j]] == l1[pos].topk(4).indices.tolist()
    with pytest.raises(LmforgeError, match="no mask"):
        lens.mask_fills_per_layer(model, tok, "the movie", k=2)
