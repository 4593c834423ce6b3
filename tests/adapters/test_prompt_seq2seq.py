"""Prompt tuning on encoder-decoder models (tiny T5 and BART built from configs), as peft's
SEQ_2_SEQ_LM prompt tuning: the prompt goes before the encoder's input embeddings, the decoder
cross-attends to it. peft loads what we save and we load what peft saves (its default table of 2 N
rows included), same logits (< 1e-5); the encoder and decoder run separately (lmforge's sft loss and
generation) give the model's own logits; greedy generation equals peft's ``generate``."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.adapters import PromptSpec, apply_adapter, disable_adapters, load_adapter, save_adapter
from lmforge.causal_lm import seq2seq_head, seq2seq_hidden
from lmforge.errors import LmforgeError
from lmforge.generation import GenerationConfig, decode

from ._models import build, randomize_adapter

peft = pytest.importorskip("peft")

N = 3
MODELS = ["t5", "bart"]


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Encoder ids (3, 7) with a right-padded row, decoder ids (3, 5)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(4, 100, (3, 5), generator=g)}


@torch.no_grad()
def logits(model, b) -> torch.Tensor:
    return model(**b).logits


def prompted(mk: str, **kw):
    model = build(mk)
    apply_adapter(model, PromptSpec(num_virtual_tokens=N, **kw))
    randomize_adapter(model)
    return model


def peft_model(mk: str, tmp_path, **cfg):
    """peft's own prompt tuning (its defaults: 2 transformer submodules), randomised and saved."""
    torch.manual_seed(5)
    pm = peft.get_peft_model(build(mk), peft.PromptTuningConfig(num_virtual_tokens=N, task_type="SEQ_2_SEQ_LM",
                                                                **cfg)).eval()
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(str(tmp_path / "p"))
    return pm


@pytest.mark.parametrize("mk", MODELS)
def test_peft_loads_ours(mk, tmp_path):
    model = prompted(mk)
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny", task_type="SEQ_2_SEQ_LM")
    pm = peft.PeftModel.from_pretrained(build(mk), str(tmp_path / "a")).eval()
    b = batch()
    torch.testing.assert_close(logits(pm, b), logits(model, b), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(build(mk), b), logits(model, b), atol=1e-3)  # the prompt matters


@pytest.mark.parametrize("mk", MODELS)
def test_we_load_peft_and_save_it_back(mk, tmp_path):
    pm = peft_model(mk, tmp_path)
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["num_transformer_submodules"] == 2  # peft's seq2seq default: a (2 N, H) table
    model = build(mk)
    spec = load_adapter(model, tmp_path / "p", kind="prompt")
    b = batch()
    torch.testing.assert_close(logits(model, b), logits(pm, b), atol=1e-5, rtol=1e-5)
    save_adapter(model, tmp_path / "back", base_model_name_or_path="tiny", task_type="SEQ_2_SEQ_LM")
    assert spec.num_transformer_submodules == 2
    theirs, ours = load_file(str(tmp_path / "p" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "back" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    again = peft.PeftModel.from_pretrained(build(mk), str(tmp_path / "back")).eval()
    torch.testing.assert_close(logits(again, b), logits(pm, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mk", MODELS)
def test_encoder_and_decoder_run_apart_give_the_models_logits(mk):
    """lmforge's sft loss and generation run the encoder, then the decoder with the source mask:
    the decoder hook extends that mask by the N prompt positions."""
    model = prompted(mk)
    b = batch()
    with torch.no_grad():
        h = seq2seq_hidden(model, b["input_ids"], b["attention_mask"], b["decoder_input_ids"])  # (B, T, H)
        w, bias, scale = seq2seq_head(model)
        apart = scale * h @ w.T + (0 if bias is None else bias)
        encoded = model.get_encoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert encoded.last_hidden_state.shape[1] == N + 7  # the decoder cross-attends to the prompt
    torch.testing.assert_close(apart, logits(model, b), atol=1e-5, rtol=1e-5)
    with disable_adapters(model):  # the DPO reference: no prompt, the source mask unchanged
        torch.testing.assert_close(logits(model, b), logits(build(mk), b))


@pytest.mark.parametrize("mk", ["t5", "bart_sharp"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_peft_generate(mk, use_cache, tmp_path):
    pm = peft_model(mk, tmp_path)
    model = build(mk)
    load_adapter(model, tmp_path / "p", kind="prompt")
    b = batch(4)
    ids, mask = b["input_ids"], b["attention_mask"]
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    ours = decode(model, ids, mask, GenerationConfig(max_new_tokens=8, use_cache=use_cache), eos_ids=[eos], pad_id=pad)
    with torch.no_grad():
        theirs = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=1,
                             use_cache=use_cache)
    theirs = [r[1:].tolist() for r in theirs]  # without the decoder start token

    def trim(rows):
        return [list(r)[:list(r).index(eos) + 1] if eos in r else [t for t in r if t != pad] for r in rows]

    assert trim(ours) == trim(theirs)
    plain = decode(build(mk), ids, mask, GenerationConfig(max_new_tokens=8), eos_ids=[eos], pad_id=pad)
    assert trim(plain) != trim(ours)  # the prompt changed the generations (the test can fail)


def test_two_submodules_only_on_encoder_decoders(tmp_path):
    with pytest.raises(LmforgeError, match="encoder-decoder models only"):
        apply_adapter(build("llama"), PromptSpec(num_virtual_tokens=N, num_transformer_submodules=2))
    peft_model("t5", tmp_path)
    llama = build("llama")
    with pytest.raises(LmforgeError, match="num_transformer_submodules=2 does not fit this model"):
        load_adapter(llama, tmp_path / "p")
    assert not hasattr(llama, "_lmforge_adapter") and all(p.requires_grad for p in llama.parameters())
