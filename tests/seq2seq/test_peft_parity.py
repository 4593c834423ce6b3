"""PEFT's SEQ_2_SEQ_LM format for tiny T5 and BART, both ways: peft loads the adapters we save and we
load the ones peft saves, with the same logits (< 1e-5), for LoRA, DoRA and IA3 (T5, the FLAN-T5 layout: gated
feed-forward and untied head, BART); bottleneck adapters
(no peft kind) round-trip in the same layout. Merged LoRA equals the adapter's outputs."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge.adapters import (BottleneckSpec, DoraSpec, Ia3Spec, LoraSpec, apply_adapter, load_adapter,
                              save_adapter, unwrap_lora)

from ._tiny import BUILD

peft = pytest.importorskip("peft")

ATTN = {"t5": ["q", "k", "v", "o", "wi", "wo"], "flan": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
        "bart": ["q_proj", "v_proj", "out_proj", "fc1", "fc2"]}
IA3 = {"t5": (["k", "v", "wo"], ["wo"]), "flan": (["k", "v", "wo"], ["wo"]),
       "bart": (["k_proj", "v_proj", "fc2"], ["fc2"])}


def ours(kind: str, mk: str):
    if kind == "lora":
        return LoraSpec(r=4, alpha=8, target_modules=ATTN[mk])
    if kind == "dora":
        return DoraSpec(r=4, alpha=8, target_modules=ATTN[mk])
    if kind == "ia3":
        return Ia3Spec(target_modules=IA3[mk][0], feedforward_modules=IA3[mk][1])
    return BottleneckSpec(reduction_factor=4, target_modules=["wo"] if mk == "t5" else ["fc2"])


def theirs(kind: str, mk: str):
    if kind == "ia3":
        return peft.IA3Config(target_modules=IA3[mk][0], feedforward_modules=IA3[mk][1], task_type="SEQ_2_SEQ_LM",
                              init_ia3_weights=False)
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN[mk], use_dora=kind == "dora",
                           task_type="SEQ_2_SEQ_LM", init_lora_weights=False)


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Encoder ids (3, 7) with a padded row, decoder ids (3, 5)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(4, 100, (3, 5), generator=g)}


@torch.no_grad()
def logits(model, b) -> torch.Tensor:
    return model(**b).logits


@torch.no_grad()
def randomize(model, seed: int = 2) -> None:
    from lmforge.adapters import adapter_state_dict

    g = torch.Generator().manual_seed(seed)
    for name, t in sorted(adapter_state_dict(model).items()):
        t.add_(torch.randn(t.shape, generator=g) * 0.2)


CASES = [(k, m) for k in ("lora", "dora", "ia3") for m in ("t5", "bart")] + [("lora", "flan"), ("ia3", "flan")]


@pytest.mark.parametrize("kind,mk", CASES, ids=lambda x: x)
def test_peft_loads_ours(kind, mk, tmp_path):
    model = BUILD[mk]()
    apply_adapter(model, ours(kind, mk))
    randomize(model)
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny", task_type="SEQ_2_SEQ_LM")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    pm = peft.PeftModel.from_pretrained(BUILD[mk](), str(tmp_path / "a")).eval()
    assert type(pm).__name__ == "PeftModelForSeq2SeqLM"
    b = batch()
    base = logits(BUILD[mk](), b)
    mine = logits(model, b)
    assert (mine - base).abs().max() > 1e-3  # the adapter changes the outputs (the test can fail)
    torch.testing.assert_close(logits(pm, b), mine, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,mk", CASES, ids=lambda x: x)
def test_we_load_peft(kind, mk, tmp_path):
    torch.manual_seed(5)
    pm = peft.get_peft_model(BUILD[mk](), theirs(kind, mk)).eval()
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(str(tmp_path / "p"))
    model = BUILD[mk]()
    load_adapter(model, tmp_path / "p", kind=kind)
    b = batch()
    torch.testing.assert_close(logits(model, b), logits(pm, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mk", ["t5", "bart"])
def test_bottleneck_round_trips_in_the_peft_layout(mk, tmp_path):
    model = BUILD[mk]()
    apply_adapter(model, ours("bottleneck", mk))
    randomize(model)
    save_adapter(model, tmp_path / "b", base_model_name_or_path="tiny", task_type="SEQ_2_SEQ_LM")
    again = BUILD[mk]()
    load_adapter(again, tmp_path / "b", kind="bottleneck")
    b = batch()
    torch.testing.assert_close(logits(again, b), logits(model, b), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind,mk", [("lora", "t5"), ("lora", "bart"), ("dora", "t5"), ("ia3", "bart")])
def test_merged_equals_unmerged(kind, mk):
    model = BUILD[mk]()
    apply_adapter(model, ours(kind, mk))
    randomize(model)
    b = batch()
    before = logits(model, b)
    unwrap_lora(model)
    torch.testing.assert_close(logits(model, b), before, atol=1e-5, rtol=1e-5)
