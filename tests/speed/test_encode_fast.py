"""Inference fast path (lmforge.fast_encode) against transformers' BertModel forward."""
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from lmforge import fast_encode
from lmforge.adapters.lora import LoraSpec, apply_lora
from lmforge.device import Placement
from lmforge.embeddings import SentenceEncoder
from lmforge.fast_encode import FastBert, _groups, supported


def _bert(act="gelu", seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, hidden_act=act, type_vocab_size=2)
    return BertModel(cfg, add_pooling_layer=False).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (5, 9), generator=g)
    mask = torch.zeros(5, 9, dtype=torch.long)
    for b, n in enumerate([9, 9, 5, 2, 1]):
        mask[b, :n] = 1
    tt = torch.zeros_like(ids)
    tt[0, 5:] = 1
    return ids * mask, mask, tt


def test_groups_by_hand():
    cu = [0, 4, 8, 10, 11]  # lengths 4, 4, 2, 1
    assert _groups(cu, 2, None) == [(0, 4)]
    assert _groups(cu, 2, 2 * 4 * 4) == [(0, 1), (1, 2), (2, 4)]  # 2 x 2 x 2^2 = 16 fits, 2 x 2 x 4^2 does not
    assert _groups(cu, 2, 10 ** 6) == [(0, 4)]
    assert _groups([0], 2, 16) == []


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
@pytest.mark.parametrize("attention,budget", [("eager", 4 * 9 * 9), ("eager", 10 ** 6), ("eager", 1), ("sdpa", None)])
@pytest.mark.parametrize("chunk", [2048, 7])
def test_fp32_equals_transformers(act, attention, budget, chunk, monkeypatch):
    """Every layout (one sequence per group, several with a key mask, one group of all), both
    kernels and the row-chunked tail of each layer (7 rows of 26: chunks and a remainder) give
    transformers' last hidden states at the real tokens, zeros at padding."""
    monkeypatch.setattr(fast_encode, "GROUP_SCORES", budget)
    monkeypatch.setattr(fast_encode, "ROW_CHUNK", chunk)
    model = _bert(act)
    ids, mask, tt = _batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        out = FastBert(model, torch.float32, attention=attention).hidden(ids, mask, tt)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)
    assert out[~keep].abs().max() == 0
    full = torch.ones_like(mask)  # no padding: the path without gathers
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=full).last_hidden_state
        out = FastBert(model, torch.float32, attention=attention).hidden(ids, full)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not built in")
def test_bf16_packed_weights_fused_gelu_close_to_fp32():
    """bf16 with oneDNN-prepacked weights and GELU fused into the GEMM: the packing really ran where
    oneDNN runs bf16 (AVX-512/AMX; on an AVX2-only CPU the plain linears, as the reorder would raise),
    and the states stay within bf16 tolerance of the fp32 forward (cosine per token)."""
    from lmforge.device import onednn_linear

    model = _bert()
    ids, mask, tt = _batch()
    fast = FastBert(model, torch.bfloat16)
    packed = [lin.packed for layer in fast.layers for lin in (layer.qkv, layer.out, layer.up, layer.down)]
    assert packed == [onednn_linear(torch.bfloat16)] * len(packed)
    assert fast.layers[0].up.act == "gelu"
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        out = fast.hidden(ids, mask, tt)
    keep = mask.bool()
    cos = torch.nn.functional.cosine_similarity(out[keep].float(), ref[keep], dim=-1)
    assert out.dtype == torch.bfloat16 and cos.min() > 0.999
    plain = FastBert(model, torch.bfloat16, pack=False)
    with torch.no_grad():
        other = plain.hidden(ids, mask, tt)
    assert not plain.layers[0].up.packed
    assert torch.nn.functional.cosine_similarity(other[keep].float(), ref[keep], dim=-1).min() > 0.999


def test_supported_refuses_changed_models():
    assert supported(_bert())
    hooked = _bert()
    hooked.encoder.layer[0].register_forward_hook(lambda m, a, o: o)
    assert not supported(hooked)
    lora = _bert()
    apply_lora(lora, LoraSpec(r=2, target_modules=["query", "value"]))
    assert not supported(lora)
    cfg = _bert().config
    cfg.position_embedding_type = "relative_key"
    assert not supported(BertModel(cfg))


@pytest.fixture()
def encoder(tiny_bert_dir):
    return SentenceEncoder.from_pretrained(tiny_bert_dir)


def test_encode_runs_fast_path_and_equals_plain(encoder):
    from tests.embeddings._helpers import sentences

    texts = sentences(19, seed=5)
    place = Placement.resolve("cpu", "fp32")
    assert encoder._fast_path(place) is not None
    fast = encoder.encode(texts, batch_size=4, placement=place)
    encoder.fast_path = False
    assert encoder._fast_path(place) is None
    plain = encoder.encode(texts, batch_size=4, placement=place)
    assert np.abs(fast - plain).max() < 1e-5


def test_weight_update_rebuilds_fast_path(encoder):
    """An optimizer step between two encodes (evaluation during training) is seen."""
    from tests.embeddings._helpers import sentences

    texts = sentences(6, seed=7)
    place = Placement.resolve("cpu", "fp32")
    before = encoder.encode(texts, placement=place)
    first = encoder._fast_path(place)
    opt = torch.optim.SGD(encoder.parameters(), lr=0.5)
    encoder.train()
    encoder(**encoder.collate(encoder.tokenize(texts))).pow(2).sum().backward()
    opt.step()
    after = encoder.encode(texts, placement=place)
    assert encoder._fast_path(place) is not first
    encoder.fast_path = False
    plain = encoder.encode(texts, placement=place)
    assert np.abs(after - before).max() > 1e-3 and np.abs(after - plain).max() < 1e-5


@pytest.mark.integration
def test_minilm_bf16_cosine_to_fp32():
    """Packaged MiniLM, bf16 inference weights: the fast path's vectors are as close to the fp32
    vectors as transformers' bf16 path (cosine >= 0.9999 per sentence)."""
    from tests.embeddings._helpers import sentences  # noqa: F401

    texts = ["A man is playing a guitar on the stage.", "The cat sat.", "Stocks fell sharply on Monday " * 20]
    ref = SentenceEncoder.from_pretrained("minilm")
    ref.fast_path = False
    want = ref.encode(texts, precision="fp32")
    enc = SentenceEncoder.from_pretrained("minilm")
    place = Placement(torch.device("cpu"), torch.bfloat16)
    enc.to_inference(place)
    got = enc.encode(texts, placement=place)
    assert enc._fast_path(place) is not None
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999


def test_encoder_built_under_inference_mode(tiny_bert_dir):
    """Parameters made under inference_mode have no version counter: the fast path still runs."""
    from tests.embeddings._helpers import sentences

    with torch.inference_mode():
        enc = SentenceEncoder.from_pretrained(tiny_bert_dir)
    place = Placement.resolve("cpu", "fp32")
    got = enc.encode(sentences(5, seed=2), placement=place)
    assert enc._fast_path(place) is not None and np.isfinite(got).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_pooled_on_packed_rows_equals_padded_pooling(dtype):
    """Mean pooling summed on the packed rows == padding the states and pooling them (fp32 sums
    in another order: 1e-6), with padding and without."""
    from lmforge.embeddings.encoder import pool

    fast = FastBert(_bert(), dtype)
    ids, mask, tt = _batch()
    with torch.no_grad():
        for m in (mask, torch.ones_like(mask)):
            want = pool(fast.hidden(ids, m, tt), m, "mean")
            got = fast.mean_pooled(ids, m, tt)
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
