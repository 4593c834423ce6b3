"""sentence-transformers folders: what we save loads in SentenceTransformer with the same vectors,
and folders sentence-transformers writes (old and 6.x layouts) load in lmforge."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.embeddings import SentenceEncoder, read_st_settings
from lmforge.errors import LmforgeError

from ._helpers import sentences

st = pytest.importorskip("sentence_transformers")
TEXTS = sentences(9, seed=11) + ["good", "the movie was not very good but the actor was superb ."]


@pytest.mark.parametrize("pooling,normalize", [("mean", False), ("cls", True), ("max", False), ("last", True)])
def test_saved_folder_gives_the_same_vectors_in_sentence_transformers(tiny_bert_dir, tmp_path, pooling, normalize):
    enc = SentenceEncoder.from_pretrained(tiny_bert_dir, pooling=pooling, normalize=normalize, max_length=48)
    out = enc.save(tmp_path / "st")
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
            "config_sentence_transformers.json", "model.safetensors", "config.json", "tokenizer.json"} <= files
    ours = enc.encode(TEXTS, batch_size=4, precision="fp32")
    theirs = st.SentenceTransformer(str(out), device="cpu").encode(TEXTS, batch_size=4)
    assert np.abs(ours - theirs).max() < 1e-5
    # and lmforge reads back what it wrote
    back = SentenceEncoder.from_pretrained(out)
    assert (back.pooling, back.normalize, back.max_length) == (pooling, normalize, 48)
    assert np.abs(back.encode(TEXTS, precision="fp32") - ours).max() < 1e-6


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_decoder_folder_gives_the_same_vectors_in_sentence_transformers(tiny_llama_dir, tmp_path, pooling):
    """A decoder backbone (unsupervised SimCSE on SmolLM2) saves as a folder ST reads identically."""
    enc = SentenceEncoder.from_pretrained(tiny_llama_dir, pooling=pooling, max_length=40)
    out = enc.save(tmp_path / "st")
    ours = enc.encode(TEXTS, batch_size=4, precision="fp32")
    theirs = st.SentenceTransformer(str(out), device="cpu").encode(TEXTS, batch_size=4)
    assert np.abs(ours - theirs).max() < 1e-5


def test_folder_written_by_sentence_transformers_loads(tiny_bert_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import models

    t = models.Transformer(str(tiny_bert_dir), max_seq_length=40)
    model = SentenceTransformer(modules=[t, models.Pooling(32, "max"),
                                         models.Normalize()], device="cpu")
    model.save(str(tmp_path / "theirs"))
    s = read_st_settings(tmp_path / "theirs")
    assert (s.pooling, s.normalize, s.is_sentence_transformers) == ("max", True, True)
    enc = SentenceEncoder.from_pretrained(tmp_path / "theirs")
    assert np.abs(enc.encode(TEXTS, precision="fp32") - model.encode(TEXTS)).max() < 1e-5


def test_legacy_pooling_config_and_plain_folders(tmp_path, tiny_bert_dir):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 77}))
    s = read_st_settings(tmp_path)
    assert (s.pooling, s.normalize, s.max_seq_length) == ("cls", False, 77)
    assert read_st_settings(tiny_bert_dir).is_sentence_transformers is False


@pytest.mark.parametrize("modules,pool_cfg,match", [
    ([{"idx": 2, "path": "2_Dense", "type": "sentence_transformers.models.Dense"}], {"pooling_mode_mean_tokens": True},
     "Dense"),
    ([], {"pooling_mode_weightedmean_tokens": True}, "not supported"),
    ([], {"pooling_mode": ["mean", "max"]}, "not supported"),
])
def test_unsupported_modules_are_clear_errors(tmp_path, modules, pool_cfg, match):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pool_cfg))
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}] + modules))
    with pytest.raises(LmforgeError, match=match):
        read_st_settings(tmp_path)


@pytest.mark.integration
def test_packaged_minilm_matches_sentence_transformers():
    from lmforge.models import resolve_model

    enc = SentenceEncoder.from_pretrained("minilm")
    assert (enc.pooling, enc.normalize, enc.max_length, enc.dim) == ("mean", True, 256, 384)
    texts = ["A man is playing a guitar.", "The weather is lovely today.", "Two dogs run on the beach together."]
    theirs = st.SentenceTransformer(str(resolve_model("minilm")), device="cpu").encode(texts)
    assert np.abs(enc.encode(texts, precision="fp32") - theirs).max() < 1e-5
    b = enc.encode(texts, precision="bf16")
    assert ((b * theirs).sum(1)).min() > 0.999  # unit vectors
