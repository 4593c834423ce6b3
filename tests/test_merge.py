"""Merge: the merged folder loads with plain transformers and equals the adapter model; a 4-bit
base is dequantised first; parity with peft's merge_and_unload; bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_yaml
from lmforge.adapters import LoraSpec, apply_lora, load_adapter, save_adapter
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.merge import merge, resolve_source
from lmforge.quant.nf4 import dequantize_model, quantize_model

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _base(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _make_run(base_dir, run_dir, *, four_bit: bool, seed: int = 0, extra: dict | None = None, block: int = 64):
    """A run directory as training leaves it: config.yaml + adapter/ (random, non-zero LoRA B)."""
    model = _base(base_dir)
    if four_bit:
        quantize_model(model, block_size=block)
    apply_lora(model, LoraSpec(r=4, alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter(model, run_dir / "adapter", base_model_name_or_path=str(base_dir), task_type="CAUSAL_LM")
    cfg = {"task": "sft", "name": run_dir.name, "model": {"name": str(base_dir)}} | (extra or {})
    write_yaml(run_dir / "config.yaml", cfg)
    return run_dir


def _ids():
    return torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def _logits(model):
    return model(input_ids=_ids()).logits


def test_merged_folder_loads_with_transformers_and_equals_adapter(tiny_llama_dir, tmp_path):
    run = _make_run(tiny_llama_dir, tmp_path / "run", four_bit=False)
    report = merge(str(run), tmp_path / "merged")
    assert report["max_abs_diff"] < 1e-5 and report["dequantized"] == 0

    adapted = _base(tiny_llama_dir)
    load_adapter(adapted, run / "adapter")
    merged = _base(tmp_path / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert (_logits(merged) - _logits(adapted)).abs().max() < 1e-5
    assert (_logits(merged) - _logits(_base(tiny_llama_dir))).abs().max() > 1e-2  # the adapter did something
    names = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any("lora" in k for k in names)
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_llama_dir).chat_template


def test_merge_equals_peft_merge_and_unload(tiny_llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    run = _make_run(tiny_llama_dir, tmp_path / "run", four_bit=False, seed=3)
    merge(str(run / "adapter"), tmp_path / "merged")  # adapter folder: base from adapter_config.json
    reference = peft.PeftModel.from_pretrained(_base(tiny_llama_dir), str(run / "adapter")).merge_and_unload()
    assert (_logits(_base(tmp_path / "merged")) - _logits(reference)).abs().max() < 1e-5


def test_4bit_base_is_dequantised_before_merging(tiny_llama_dir, tmp_path):
    # the sft task's config: sft.mode qlora, sft.quant_block_size
    run = _make_run(tiny_llama_dir, tmp_path / "run", four_bit=True, block=32,
                    extra={"sft": {"mode": "qlora", "quant_block_size": 32}})
    report = merge(str(run), tmp_path / "merged")
    assert report["dequantized"] > 0 and report["max_abs_diff"] < 1e-5

    reference = _base(tiny_llama_dir)  # dequantised NF4 base + adapter
    quantize_model(reference, block_size=32)
    load_adapter(reference, run / "adapter")
    four_bit_out = _logits(reference)
    dequantize_model(reference, torch.float32)
    merged = _base(tmp_path / "merged")
    assert (_logits(merged) - _logits(reference)).abs().max() < 1e-5
    assert (_logits(merged) - four_bit_out).abs().max() < 1e-5
    full_precision = _base(tiny_llama_dir)  # the adapter on the original fp32 base differs
    load_adapter(full_precision, run / "adapter")
    assert (_logits(merged) - _logits(full_precision)).abs().max() > 1e-4
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in cfg


def test_bf16_merge_and_cli(tiny_llama_dir, tmp_path, capsys):
    run = _make_run(tiny_llama_dir, tmp_path / "run", four_bit=False)
    assert main(["merge", str(run), "--out", str(tmp_path / "m"), "--dtype", "bf16"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["dtype"] == "bf16" and 0 < report["max_abs_diff"] < 0.5
    assert next(_base(tmp_path / "m").parameters()).dtype == torch.float32  # loaded as asked
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_merge_bad_input(tiny_llama_dir, tmp_path, capsys):
    run = _make_run(tiny_llama_dir, tmp_path / "run", four_bit=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(LmforgeError, match="not empty"):
        merge(str(run), tmp_path / "taken")
    with pytest.raises(LmforgeError, match="not a run directory or a PEFT adapter"):
        merge(str(tmp_path / "taken"), tmp_path / "out")
    assert main(["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error:")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()


def test_the_typed_config_says_4bit(tiny_llama_dir, tmp_path):
    """``mode: qlora`` in the run's typed config decides; key names are not guessed."""
    qlora = _make_run(tiny_llama_dir, tmp_path / "q", four_bit=True, block=32,
                      extra={"sft": {"mode": "qlora", "quant_block_size": 32}})
    src = resolve_source(str(qlora))
    assert src.base_4bit and src.quant_block_size == 32
    lora = _make_run(tiny_llama_dir, tmp_path / "l", four_bit=False, extra={"sft": {"mode": "lora"}})
    assert not resolve_source(str(lora)).base_4bit
    guessed = _make_run(tiny_llama_dir, tmp_path / "g", four_bit=False, extra={"lora": {"bits": 4}})
    with pytest.raises(LmforgeError, match="unknown key 'lora.bits'"):
        resolve_source(str(guessed))


def test_resolve_source(tiny_llama_dir, tmp_path):
    run = _make_run(tiny_llama_dir, tmp_path / "run", four_bit=False)
    by_run = resolve_source(str(run))
    assert (by_run.base, by_run.adapter, by_run.base_4bit) == (str(tiny_llama_dir), run / "adapter", False)
    by_adapter = resolve_source(str(tiny_llama_dir), str(run))
    assert by_adapter.adapter == run / "adapter" and by_adapter.base == str(tiny_llama_dir)
    assert resolve_source(str(tiny_llama_dir)).adapter is None
