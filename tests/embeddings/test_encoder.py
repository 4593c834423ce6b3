"""Pooling by hand, and encode(): input order, batching/length sorting, precision, normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.embeddings import SentenceEncoder, pool
from lmforge.errors import LmforgeError

from ._helpers import sentences

H = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]],
                  [[-1.0, 0.0], [5.0, 6.0], [7.0, -8.0]]])  # (2, 3, 2)
M = torch.tensor([[1, 1, 0], [1, 1, 1]])  # row 0 has a padded last token


@pytest.mark.parametrize("mode,expected", [
    ("mean", [[2.0, -1.0], [11 / 3, -2 / 3]]),
    ("cls", [[1.0, 2.0], [-1.0, 0.0]]),
    ("max", [[3.0, 2.0], [7.0, 6.0]]),
    ("last", [[3.0, -4.0], [7.0, -8.0]]),
])
def test_pool_by_hand_ignores_padding(mode, expected):
    assert torch.allclose(pool(H, M, mode), torch.tensor(expected), atol=1e-6)


def test_pool_half_precision_is_pooled_in_fp32():
    out = pool(H.bfloat16(), M, "mean")
    assert out.dtype == torch.float32


def test_unknown_pooling_is_a_clear_error(tiny_bert_dir):
    with pytest.raises(LmforgeError, match="pooling must be one of"):
        SentenceEncoder.from_pretrained(tiny_bert_dir, pooling="median")


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir):
    return SentenceEncoder.from_pretrained(tiny_bert_dir)


def test_plain_hf_folder_defaults(encoder):
    assert (encoder.pooling, encoder.normalize, encoder.dim) == ("mean", False, 32)


def test_encode_keeps_input_order_and_matches_one_by_one(encoder):
    texts = sentences(23, seed=3)
    batched = encoder.encode(texts, batch_size=4, precision="fp32")  # length-sorted, padded batches
    single = np.concatenate([encoder.encode([t], precision="fp32") for t in texts])
    assert batched.shape == (23, 32) and batched.dtype == np.float32
    assert np.abs(batched - single).max() < 1e-5
    # direct forward of one padded batch in input order gives the same rows
    feats = encoder.collate(encoder.tokenize(texts))
    with torch.no_grad():
        direct = encoder(**feats).numpy()
    assert np.abs(batched - direct).max() < 1e-5


def test_encode_normalize_override(encoder):
    texts = sentences(5, seed=4)
    raw = encoder.encode(texts, precision="fp32")
    unit = encoder.encode(texts, precision="fp32", normalize=True)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert np.allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_encode_bf16_is_close_to_fp32(encoder):
    texts = sentences(12, seed=5)
    a = encoder.encode(texts, precision="fp32")
    b = encoder.encode(texts, precision="bf16")
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_encode_restores_training_mode_and_handles_empty_input(encoder):
    encoder.train()
    assert encoder.encode([], precision="fp32").shape == (0, 32)
    assert encoder.training
    encoder.eval()


def test_max_length_truncates(tiny_bert_dir):
    enc = SentenceEncoder.from_pretrained(tiny_bert_dir, max_length=4)
    assert max(len(x) for x in enc.tokenize(sentences(6, seed=6, lo=6, hi=9))) == 4


def test_decoder_backbone_with_mean_pooling(tiny_llama_dir):
    enc = SentenceEncoder.from_pretrained(tiny_llama_dir, pooling="mean")
    texts = sentences(7, seed=7)
    batched = enc.encode(texts, batch_size=3, precision="fp32")
    single = np.concatenate([enc.encode([t], precision="fp32") for t in texts])
    assert np.abs(batched - single).max() < 1e-4


def test_decoder_dropout_noises_hidden_states_in_training_only(tiny_llama_dir):
    """Llama configs have attention dropout only: `residual_dropout` adds one on embeddings and on
    each residual branch (o_proj, down_proj), so two training-mode views differ; eval mode is exact."""
    plain = SentenceEncoder.from_pretrained(tiny_llama_dir, pooling="mean")
    noisy = SentenceEncoder.from_pretrained(tiny_llama_dir, pooling="mean", dropout=0.2, residual_dropout=0.2)
    assert not any(m._forward_hooks for m in SentenceEncoder.from_pretrained(tiny_llama_dir, dropout=0.2).modules())
    n_layers = noisy.backbone.config.num_hidden_layers
    hooked = [m for m in noisy.backbone.modules() if m._forward_hooks]
    assert len(hooked) == 1 + 2 * n_layers
    assert noisy.backbone.config.attention_dropout == 0.2
    batch = noisy.collate(noisy.tokenize(sentences(4, seed=8)))
    noisy.eval()
    with torch.no_grad():
        assert torch.allclose(noisy(**batch), plain.eval()(**batch), atol=1e-6)
    seen = []
    emb = noisy.backbone.get_input_embeddings()
    h = emb.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))  # runs after the dropout hook
    try:
        with torch.no_grad():
            noisy(**batch)  # eval mode: the clean embeddings
            noisy.train()
            torch.manual_seed(0)
            v1, v2 = noisy(**batch), noisy(**batch)
    finally:
        h.remove()
    assert not torch.allclose(v1, v2)
    clean = seen[0] != 0
    dropped = [((s == 0) & clean).sum().item() / clean.sum().item() for s in seen[1:]]
    assert all(0.12 < d < 0.28 for d in dropped)  # about 20% of the embedding entries
    kept = seen[1][seen[1] != 0]
    assert torch.allclose(kept, (seen[0] / 0.8)[seen[1] != 0])  # inverted dropout scaling


def test_bert_dropout_adds_no_hooks(tiny_bert_dir):
    enc = SentenceEncoder.from_pretrained(tiny_bert_dir, dropout=0.1)
    assert enc.backbone.config.hidden_dropout_prob == 0.1
    assert not any(m._forward_hooks for m in enc.backbone.modules())
    with pytest.raises(LmforgeError, match="own hidden dropout"):
        SentenceEncoder.from_pretrained(tiny_bert_dir, residual_dropout=0.1)


def test_encode_batches_are_length_sorted(encoder):
    """Each forward pass gets texts of similar length: widths are the sorted lengths cut into batches."""
    texts = sentences(23, seed=13, lo=1, hi=14)
    lengths = sorted((len(x) for x in encoder.tokenize(texts)), reverse=True)
    widths = []
    hook = encoder.backbone.register_forward_pre_hook(
        lambda m, args, kw: widths.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        encoder.encode(texts, batch_size=5, precision="fp32")
    finally:
        hook.remove()
    assert widths == [(len(lengths[s:s + 5]), lengths[s]) for s in range(0, 23, 5)]


def test_encode_progress_bar(encoder, capsys):
    texts = sentences(7, seed=14)
    encoder.encode(texts, batch_size=3, precision="fp32", progress=True)
    err = capsys.readouterr().err
    assert "encode" in err and "7/7" in err
    encoder.encode(texts, batch_size=3, precision="fp32")
    assert capsys.readouterr().err == ""


def test_tokenize_ahead_gives_encode_the_same_ids(encoder):
    """tokenize_ahead(texts) on a background thread: the next encode() of that very list takes
    its ids (the same vectors as tokenising there), anything else is tokenised as before."""
    texts = sentences(40, seed=3)
    want = encoder.encode(texts, batch_size=8)
    encoder.tokenize_ahead(texts)
    assert encoder._ahead[0] is texts
    np.testing.assert_array_equal(encoder.encode(texts, batch_size=8), want)
    assert encoder._ahead is None  # taken once
    encoder.tokenize_ahead(texts)
    other = list(texts[:5])  # equal texts, another object: tokenised there, the prefetch dropped
    np.testing.assert_array_equal(encoder.encode(other, batch_size=8), want[:5])
    assert encoder._ahead is None


def test_tokenize_ahead_error_is_raised_by_encode(encoder):
    texts = ["fine", None]  # the tokenizer rejects None on its thread
    encoder.tokenize_ahead(texts)
    with pytest.raises((TypeError, ValueError)):
        encoder.encode(texts)
