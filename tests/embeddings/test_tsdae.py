"""TSDAE: deletion noise, a decoder tied to the encoder, and the reconstruction loss by hand."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lmforge.embeddings import SentenceEncoder
from lmforge.embeddings.tsdae import build_tied_decoder, delete_words, tsdae_loss
from lmforge.errors import LmforgeError

from ._helpers import sentences


def test_delete_words():
    rng = random.Random(0)
    text = " ".join(f"w{i}" for i in range(2000))
    kept = delete_words(text, 0.6, rng).split()
    assert 0.35 < len(kept) / 2000 < 0.45  # keep probability 0.4
    assert kept == [w for w in text.split() if w in set(kept)]  # order kept, nothing invented
    assert delete_words("a b c", 0.0, rng) == "a b c"
    assert all(len(delete_words("one two", 0.99, random.Random(s)).split()) >= 1 for s in range(50))


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir):
    return SentenceEncoder.from_pretrained(tiny_bert_dir)


def test_decoder_is_tied_to_the_encoder(encoder):
    dec = build_tied_decoder(encoder.backbone)
    enc_params = {id(p) for p in encoder.backbone.parameters()}
    base = dec.base_model
    query = encoder.backbone.encoder.layer[0].attention.self.query
    assert base.encoder.layer[0].attention.self.query.weight is query.weight
    assert dec.get_output_embeddings().weight is encoder.backbone.get_input_embeddings().weight
    own = [n for n, p in dec.named_parameters() if id(p) not in enc_params]
    assert own and all("crossattention" in n or n.startswith("cls.") for n in own)


def test_tsdae_loss_by_hand_and_gradients_reach_the_encoder(encoder):
    dec = build_tied_decoder(encoder.backbone)
    texts = sentences(4, seed=9)
    noisy = [delete_words(t, 0.6, random.Random(i)) for i, t in enumerate(texts)]
    src, tgt = encoder.collate(encoder.tokenize(noisy)), encoder.collate(encoder.tokenize(texts))
    emb = encoder(**src)  # (B, D)
    loss = tsdae_loss(dec, emb, tgt["input_ids"], tgt["attention_mask"])
    logits = dec(input_ids=tgt["input_ids"][:, :-1], attention_mask=tgt["attention_mask"][:, :-1],
                 encoder_hidden_states=emb[:, None], use_cache=False).logits
    terms = []
    for i in range(len(texts)):
        n = int(tgt["attention_mask"][i].sum())
        for t in range(n - 1):  # predict token t+1 from tokens <= t
            terms.append(-F.log_softmax(logits[i, t], -1)[tgt["input_ids"][i, t + 1]])
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)
    loss.backward()
    assert encoder.backbone.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    encoder.zero_grad(set_to_none=True)


def test_decoder_models_are_refused(tiny_llama_dir):
    enc = SentenceEncoder.from_pretrained(tiny_llama_dir)
    with pytest.raises(LmforgeError, match="tsdae"):
        build_tied_decoder(enc.backbone)


def test_loss_matches_sentence_transformers(tiny_bert_dir):
    st = pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import DenoisingAutoEncoderLoss
    try:
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import models

    torch.manual_seed(0)
    t = models.Transformer(str(tiny_bert_dir))
    model = st.SentenceTransformer(modules=[t, models.Pooling(32, "mean")], device="cpu")
    theirs = DenoisingAutoEncoderLoss(model, tie_encoder_decoder=True)
    backbone = t.auto_model
    enc = SentenceEncoder(backbone, t.tokenizer, pooling="mean")
    dec = build_tied_decoder(backbone)
    missing, unexpected = dec.load_state_dict(theirs.decoder.state_dict(), strict=False)  # their fresh weights
    assert not unexpected and not missing
    texts = sentences(5, seed=12)
    noisy = [delete_words(x, 0.6, random.Random(i)) for i, x in enumerate(texts)]
    src, tgt = enc.collate(enc.tokenize(noisy)), enc.collate(enc.tokenize(texts))
    ours = tsdae_loss(dec, enc(**src), tgt["input_ids"], tgt["attention_mask"])
    ref = theirs([dict(src), dict(tgt)], None)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
