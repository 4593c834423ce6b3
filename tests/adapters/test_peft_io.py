import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.adapters import (LoraLinear, LoraSpec, ModulesToSave, apply_lora, load_adapter,
                              read_adapter_config, save_adapter)
from lmforge.errors import LmforgeError

from ._models import build, inputs, output, randomize_adapter

peft = pytest.importorskip("peft")

OURS_TO_PEFT = {
    "bert_cls": ("SEQ_CLS", dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "llama": ("CAUSAL_LM", dict(target_modules=["q_proj", "v_proj"])),
}


def _saved(kind, tmp_path, rslora, dropout=0.0):
    task, kw = OURS_TO_PEFT[kind]
    model = build(kind)
    apply_lora(model, LoraSpec(r=4, alpha=8, dropout=dropout, use_rslora=rslora, **kw))
    randomize_adapter(model)
    out = save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-" + kind,
                       task_type=task)
    return model, out


def test_saved_files_and_config(tmp_path):
    _, out = _saved("bert_cls", tmp_path, rslora=True, dropout=0.1)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind
    cfg = read_adapter_config(out)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (4, 8, 0.1, True)
    assert cfg["target_modules"] == ["query", "value"] and cfg["modules_to_save"] == ["classifier"]
    assert cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False and cfg["inference_mode"] is True
    assert cfg["base_model_name_or_path"] == "tiny-bert_cls"
    pc = peft.LoraConfig.from_pretrained(str(out))  # peft parses every field we write
    assert (pc.r, pc.lora_alpha, pc.use_rslora, set(pc.target_modules)) == (4, 8, True, {"query", "value"})
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in keys
    assert "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight" in keys


def test_save_into_existing_folder_keeps_other_files(tmp_path):
    model, out = _saved("llama", tmp_path, rslora=False)
    (out / "README.md").write_text("notes")
    (out / "adapter_config.json").write_text("{}")
    save_adapter(model, out, base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    assert (out / "README.md").read_text() == "notes"
    assert read_adapter_config(out)["task_type"] == "CAUSAL_LM"
    assert not list(tmp_path.glob(".*tmp*"))


def test_save_without_lora_is_an_error(tmp_path):
    with pytest.raises(LmforgeError, match="no LoRA adapters"):
        save_adapter(build("llama"), tmp_path / "x", base_model_name_or_path="t", task_type=None)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("kind", list(OURS_TO_PEFT))
def test_peft_loads_our_adapter(kind, rslora, tmp_path):
    model, out = _saved(kind, tmp_path, rslora)
    theirs = peft.PeftModel.from_pretrained(build(kind), str(out)).eval()
    batch = inputs()
    ours = output(model, batch)
    assert not torch.allclose(ours, output(build(kind), batch))  # the adapter does something
    assert (output(theirs, batch) - ours).abs().max() < 1e-5


PEFT_TO_OURS = {  # kind -> (task type, LoraConfig kwargs)
    "bert_cls": ("SEQ_CLS", dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "bert_tok": ("TOKEN_CLS", dict(target_modules=["query", "key", "dense"])),  # implicit head
    "bert": ("FEATURE_EXTRACTION", dict(target_modules=r".*layer\.\d+\.attention\.self\.(query|value)")),
    "llama": ("CAUSAL_LM", dict(target_modules=r".*\.(q_proj|v_proj)")),
}


def _peft_saved(kind, tmp_path, rslora):
    task, kw = PEFT_TO_OURS[kind]
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, task_type=task, **kw)
    pm = peft.get_peft_model(build(kind), config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)  # B becomes non-zero
    pm.save_pretrained(str(tmp_path / "peft"))
    return pm, tmp_path / "peft"


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("kind", list(PEFT_TO_OURS))
def test_we_load_peft_adapter(kind, rslora, tmp_path):
    pm, folder = _peft_saved(kind, tmp_path, rslora)
    model = build(kind)
    spec = load_adapter(model, folder)
    assert spec.use_rslora is rslora and spec.r == 4 and spec.alpha == 8
    target = PEFT_TO_OURS[kind][1]["target_modules"]
    if isinstance(target, str):
        assert spec.target_modules == target
    else:  # peft stores the list as a set, in arbitrary order
        assert sorted(spec.target_modules) == sorted(target)
    if kind in ("bert_cls", "bert_tok"):
        assert isinstance(model.classifier, ModulesToSave)
    batch = inputs()
    ours = output(model, batch)
    assert not torch.allclose(ours, output(build(kind), batch))
    assert (output(pm, batch) - ours).abs().max() < 1e-5


# ---------------------------------------------------------------- errors
def test_missing_and_malformed_folders(tmp_path):
    with pytest.raises(LmforgeError, match="adapter folder not found"):
        load_adapter(build("llama"), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match="adapter_config.json not found"):
        load_adapter(build("llama"), tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="malformed JSON"):
        read_adapter_config(bad)
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "r": 4,
                                                         "target_modules": ["q"]}))
    with pytest.raises(LmforgeError, match="VERA"):
        read_adapter_config(bad)
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(LmforgeError, match="target_modules"):
        read_adapter_config(bad)


def test_unsupported_variant_refused(tmp_path):
    _, out = _saved("llama", tmp_path, rslora=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = True
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmforgeError, match="fan_in_fan_out"):
        load_adapter(build("llama"), out)


def test_missing_weights_file(tmp_path):
    _, out = _saved("llama", tmp_path, rslora=False)
    (out / "adapter_model.safetensors").unlink()
    with pytest.raises(LmforgeError, match="adapter_model.safetensors not found"):
        load_adapter(build("llama"), out)


def _edit_weights(out, fn):
    path = out / "adapter_model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def _assert_untouched(model, kind):
    assert not any(isinstance(m, (LoraLinear, ModulesToSave)) for m in model.modules())
    assert not hasattr(model, "_lmforge_adapter")
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(output(model, inputs()), output(build(kind), inputs()))


def test_strict_keys(tmp_path):
    _, out = _saved("bert_cls", tmp_path, rslora=False)
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    _edit_weights(out, lambda t: t.update({"base_model.model.extra.lora_A.weight": torch.zeros(1)}))
    model = build("bert_cls")
    with pytest.raises(LmforgeError, match="unexpected tensor 'base_model.model.extra.lora_A.weight'"):
        load_adapter(model, out)
    _assert_untouched(model, "bert_cls")
    _edit_weights(out, lambda t: (t.pop(key), t.pop("base_model.model.extra.lora_A.weight")))
    with pytest.raises(LmforgeError, match=f"lacks tensor '{key}'"):
        load_adapter(model, out)
    _assert_untouched(model, "bert_cls")


def test_shape_mismatch(tmp_path):
    _, out = _saved("llama", tmp_path, rslora=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["r"] = 2
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    model = build("llama")
    with pytest.raises(LmforgeError, match="has shape"):
        load_adapter(model, out)
    _assert_untouched(model, "llama")
