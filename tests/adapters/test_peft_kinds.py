"""peft parity for DoRA, IA3 and prompt tuning, both ways, on a tiny encoder (BERT classifier,
BERT feature extractor) and a tiny decoder (Llama): peft loads what we save and we load what peft
saves, with the same outputs (< 1e-5). Bottleneck adapters (no peft kind) round-trip in the same
folder layout under their own type."""
import json

import pytest
import torch

from lmforge.adapters import (BottleneckSpec, DoraSpec, Ia3Spec, PromptSpec, adapter_folder_kind, apply_adapter,
                              load_adapter, save_adapter)
from lmforge.errors import LmforgeError

from ._models import build, inputs, output, randomize_adapter

peft = pytest.importorskip("peft")

TASK = {"bert_cls": "SEQ_CLS", "bert": "FEATURE_EXTRACTION", "llama": "CAUSAL_LM"}
ATTN = {"bert_cls": ["query", "value"], "bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
HEAD = {"bert_cls": ["classifier"], "bert": [], "llama": []}
N_PROMPT = 3


def ours(kind: str, mk: str):
    return {"dora": DoraSpec(r=4, alpha=8, target_modules=ATTN[mk], modules_to_save=HEAD[mk]),
            "ia3": Ia3Spec(modules_to_save=HEAD[mk]),
            "prompt": PromptSpec(num_virtual_tokens=N_PROMPT, modules_to_save=HEAD[mk])}[kind]


def theirs(kind: str, mk: str):
    task = TASK[mk]
    if kind == "dora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTN[mk], use_dora=True, task_type=task,
                               init_lora_weights=False)  # random B: a non-trivial adapter
    if kind == "ia3":
        ff = "down_proj" if mk == "llama" else r".*layer\.\d+\.output\.dense"
        target = ["k_proj", "v_proj", "down_proj"] if mk == "llama" else r".*(key|value|layer\.\d+\.output\.dense)"
        return peft.IA3Config(target_modules=target, feedforward_modules=ff, task_type=task, init_ia3_weights=False)
    return peft.PromptTuningConfig(num_virtual_tokens=N_PROMPT, task_type=task)


@torch.no_grad()
def peft_output(pm, mk: str, kind: str, batch):
    out = pm(**batch)
    if mk == "llama":
        logits = out.logits
        return logits[:, N_PROMPT:] if kind == "prompt" else logits  # peft keeps the virtual positions
    if mk == "bert":
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return h[:, N_PROMPT:] if kind == "prompt" else h
    return out.logits


CASES = [(k, m) for k in ("dora", "ia3", "prompt") for m in ("bert_cls", "bert", "llama")]


@pytest.mark.parametrize("kind,mk", CASES, ids=lambda x: x)
def test_peft_loads_ours(kind, mk, tmp_path):
    model = build(mk)
    apply_adapter(model, ours(kind, mk))
    randomize_adapter(model)
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny", task_type=TASK[mk])
    pm = peft.PeftModel.from_pretrained(build(mk), str(tmp_path / "a")).eval()
    batch = inputs()
    torch.testing.assert_close(peft_output(pm, mk, kind, batch), output(model, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,mk", CASES, ids=lambda x: x)
def test_we_load_peft(kind, mk, tmp_path):
    torch.manual_seed(5)
    pm = peft.get_peft_model(build(mk), theirs(kind, mk)).eval()
    with torch.no_grad():  # make every adapter tensor non-trivial (peft's DoRA/IA3/prompt init may be the identity)
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(str(tmp_path / "p"))
    assert adapter_folder_kind(tmp_path / "p") == kind
    model = build(mk)
    load_adapter(model, tmp_path / "p", kind=kind)
    batch = inputs()
    torch.testing.assert_close(output(model, batch), peft_output(pm, mk, kind, batch), atol=1e-5, rtol=1e-5)


def test_dora_config_and_names(tmp_path):
    model = build("llama")
    apply_adapter(model, DoraSpec(r=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "a")).use_dora


def test_bottleneck_folder_has_its_own_type(tmp_path):
    model = build("llama")
    apply_adapter(model, BottleneckSpec(reduction_factor=4))
    randomize_adapter(model)
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["reduction_factor"] == 4
    fresh = build("llama")
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(output(fresh, inputs()), output(model, inputs()))


def test_folder_of_one_kind_loaded_as_another(tmp_path):
    model = build("llama")
    apply_adapter(model, Ia3Spec())
    save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    fresh = build("llama")
    with pytest.raises(LmforgeError, match="is a ia3 adapter, not lora"):
        load_adapter(fresh, tmp_path / "a", kind="lora")
    assert not hasattr(fresh, "_lmforge_adapter")


def test_shape_mismatch_names_tensor_and_leaves_model_untouched(tmp_path):
    from ._models import llama_config
    from transformers import LlamaForCausalLM

    for spec in (PromptSpec(num_virtual_tokens=2), DoraSpec(r=2, target_modules=["q_proj"])):
        model = build("llama")
        apply_adapter(model, spec)
        save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny", task_type="CAUSAL_LM")
        wide = LlamaForCausalLM(llama_config(hidden_size=48, intermediate_size=64)).eval()
        before = output(wide, inputs())
        with pytest.raises(LmforgeError, match="has shape .* the model expects"):
            load_adapter(wide, tmp_path / "a")
        assert not hasattr(wide, "_lmforge_adapter") and not hasattr(wide, "lmforge_prompt")
        torch.testing.assert_close(output(wide, inputs()), before)
