"""Model references: local folders, missing paths, hub ids offline, and .gguf files dequantised once."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sentiment_rows, write_jsonl, write_yaml

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.models import (PACKAGED, cache_dir, is_decoder_only, load_tokenizer, package_path, resolve_model)

HIDDEN, FF, LAYERS, HEADS, KV = 32, 64, 2, 4, 2


def _byte_symbols() -> list[str]:
    """The 256 byte-level BPE symbols: printable bytes stand for themselves, the rest map above 255."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF with a byte-level BPE tokenizer; FFN/embedding weights in Q8_0.

    Returns the float weights written (before quantisation), by GGUF tensor name.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _byte_symbols() + ["Ġt", "he", "Ġthe"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(LAYERS)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    written: dict[str, np.ndarray] = {}

    def add(name: str, *shape: int, quantise: bool = False, ones: bool = False):
        arr = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * 0.05).astype(np.float32)
        written[name] = arr
        if quantise:
            w.add_tensor(name, gguf.quants.quantize(arr, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", len(tokens), HIDDEN, quantise=True)       # (V, H)
    for i in range(LAYERS):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", HIDDEN, ones=True)
        add(p + "ffn_norm.weight", HIDDEN, ones=True)
        add(p + "attn_q.weight", HIDDEN, HIDDEN)
        add(p + "attn_k.weight", HIDDEN // HEADS * KV, HIDDEN)
        add(p + "attn_v.weight", HIDDEN // HEADS * KV, HIDDEN)
        add(p + "attn_output.weight", HIDDEN, HIDDEN)
        add(p + "ffn_gate.weight", FF, HIDDEN, quantise=True)
        add(p + "ffn_up.weight", FF, HIDDEN, quantise=True)
        add(p + "ffn_down.weight", HIDDEN, FF, quantise=True)
    add("output_norm.weight", HIDDEN, ones=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def test_local_folder_resolves_to_itself(tiny_bert_dir, tiny_llama_dir):
    assert resolve_model(str(tiny_bert_dir)) == tiny_bert_dir
    tok = load_tokenizer(resolve_model(str(tiny_llama_dir)))
    assert tok.pad_token == "<pad>"


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="not a Hugging Face model folder"):
        resolve_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("ref", ["./no/such/model", "/no/such/model.gguf", "~/missing-model-dir", "a/b/c/d"])
def test_missing_model_lists_packaged_aliases(ref):
    with pytest.raises(LmforgeError) as exc:
        resolve_model(ref)
    msg = str(exc.value)
    assert "\n" not in msg and "not found" in msg
    assert all(alias in msg for alias in PACKAGED)


def test_hub_id_offline_is_one_line_naming_the_aliases(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read once at import time
    with pytest.raises(LmforgeError) as exc:
        resolve_model("someone/tiny-model-that-is-not-cached")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "could not be fetched" in msg and "someone/tiny-model-that-is-not-cached" in msg
    assert all(alias in msg for alias in PACKAGED)


def test_missing_model_through_the_cli(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(10))
    recipe = write_yaml(tmp_path / "r.yaml", {
        "task": "classify", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tmp_path / "nope")},
        "data": {"train": str(tmp_path / "train.jsonl")}})
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0] and "minilm" in err[0]
    assert not (tmp_path / "runs").exists()


def test_package_path_of_a_missing_package():
    with pytest.raises(LmforgeError, match="not installed"):
        package_path("no_such_package_lmforge", "x")


def test_gguf_is_dequantised_once_into_the_cache(tmp_path, monkeypatch):
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    from transformers import AutoModelForCausalLM

    gguf_file = tmp_path / "tiny.gguf"
    written = write_tiny_gguf(gguf_file)

    calls = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):  # counts loads; the loading itself is transformers'
        calls.append(kwargs.get("gguf_file"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))

    folder = resolve_model(str(gguf_file))
    assert calls == ["tiny.gguf"]
    assert folder.parent == cache_dir() / "gguf" and folder.name.startswith("tiny-")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    dir_stamp = folder.stat().st_mtime_ns

    # the second resolve (file, or a folder holding exactly that one .gguf) reuses the cache
    assert resolve_model(str(gguf_file)) == folder
    assert resolve_model(str(tmp_path)) == folder
    assert calls == ["tiny.gguf"]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
    assert folder.stat().st_mtime_ns == dir_stamp

    model = original(AutoModelForCausalLM, str(folder))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == HIDDEN
    assert model.config.num_hidden_layers == LAYERS and model.config.num_key_value_heads == KV
    emb = model.get_input_embeddings().weight.detach()                    # (V, H) fp32
    assert emb.dtype == torch.float32
    q8 = quants.dequantize(quants.quantize(written["token_embd.weight"], Q.Q8_0), Q.Q8_0)
    torch.testing.assert_close(emb, torch.from_numpy(q8), rtol=0, atol=1e-6)
    assert torch.equal(model.get_output_embeddings().weight, emb)         # tied: no output.weight
    up = model.model.layers[1].mlp.up_proj.weight.detach().numpy()        # (FF, H)
    assert np.abs(up - written["blk.1.ffn_up.weight"]).max() < 0.01       # Q8_0 error is small
    tok = load_tokenizer(folder)
    assert tok.pad_token is not None and len(tok("the the").input_ids) >= 2
    assert is_decoder_only(model.config)


def test_is_decoder_only(tiny_bert_dir, tiny_llama_dir):
    from transformers import AutoConfig

    assert not is_decoder_only(AutoConfig.from_pretrained(tiny_bert_dir))
    assert is_decoder_only(AutoConfig.from_pretrained(tiny_llama_dir))
