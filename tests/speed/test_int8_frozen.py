"""int8 products of an adapter run's frozen linear layers (lmforge.int8_frozen, precision int8):
forward and input gradient against the fp32 layer, the codes following an in-place weight update,
which layers convert (frozen bases, not adapters or heads), and a LoRA classification run that
learns the synthetic task in int8 and predicts the same after reloading."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import sentiment_rows, write_jsonl
from torch import nn

from lmforge import cpu_kernels
from lmforge.int8_frozen import Int8FrozenLinear, int8_frozen


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _pair(seed=0, inp=96, out=80):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(out, generator=g))
    ref = nn.Linear(inp, out)
    ref.load_state_dict(lin.state_dict())
    for p in list(lin.parameters()) + list(ref.parameters()):
        p.requires_grad_(False)
    assert int8_frozen(nn.Sequential(lin)) == 1 and type(lin) is Int8FrozenLinear
    return lin, ref


def test_forward_and_input_gradient_follow_the_fp32_layer():
    lin, ref = _pair()
    x = torch.randn(5, 7, 96, generator=torch.Generator().manual_seed(1), requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = lin(x), ref(xr)
    assert y.shape == yr.shape == (5, 7, 80)
    assert _cos(y, yr) > 0.999 and (y - yr).abs().max() < 0.05 * yr.abs().max()
    assert not torch.equal(y, yr)  # the int8 product, not the fp32 one
    g = torch.randn(5, 7, 80, generator=torch.Generator().manual_seed(2))
    (y * g).sum().backward()
    (yr * g).sum().backward()
    assert _cos(x.grad, xr.grad) > 0.999 and (x.grad - xr.grad).abs().max() < 0.05 * xr.grad.abs().max()
    assert not torch.equal(x.grad, xr.grad)  # the input gradient runs in int8 too


def test_the_codes_follow_an_in_place_weight_update():
    lin, ref = _pair(seed=3)
    x = torch.randn(4, 96)
    lin(x)
    with torch.no_grad():
        lin.weight.mul_(-2.0)
        ref.weight.mul_(-2.0)
    assert _cos(lin(x), ref(x)) > 0.999


def test_a_weight_that_trains_takes_the_plain_product():
    lin, ref = _pair(seed=4)
    x = torch.randn(3, 96)
    lin.weight.requires_grad_(True)
    ref.weight.requires_grad_(True)
    assert torch.equal(lin(x), ref(x))


def test_only_frozen_plain_linears_convert():
    from lmforge.adapters.lora import LoraSpec, apply_lora

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(model, LoraSpec(r=2, alpha=4, target_modules=["0"]))
    for p in model[2].parameters():
        p.requires_grad_(True)  # a trained head
    assert int8_frozen(model) == 2  # the LoRA layer's base and the middle layer
    assert type(model[1]) is Int8FrozenLinear and type(model[2]) is nn.Linear
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if "lora_" in n and isinstance(m, nn.Linear))


@pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler: torch fallbacks (slow, same numbers)")
def test_a_lora_classification_run_in_int8_learns_and_reloads(tmp_path, tiny_bert_dir):
    from lmforge.commands.core import prepare_run_dir
    from lmforge.config import build_config
    from lmforge.tasks.classify import ClassifyTask
    from lmforge.train import fit

    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(400, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(64, seed=2))
    cfg = build_config({
        "task": "classify", "name": "int8", "output_dir": str(tmp_path / "runs"),
        "model": {"name": str(tiny_bert_dir), "precision": "int8"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 32},
        "classify": {"mode": "lora"}, "train": {"batch_size": 16, "progress": False, "lr": 1e-2, "epochs": 5}})
    task = ClassifyTask(cfg)
    assert sum(type(m) is Int8FrozenLinear for m in task.model.modules()) > 0
    run_dir = prepare_run_dir(cfg)
    fit(task, cfg, run_dir)
    task.save(run_dir)
    assert json.loads((run_dir / "eval.json").read_text())["accuracy"] > 0.9
    reloaded = ClassifyTask.from_run(run_dir)
    assert any(type(m) is Int8FrozenLinear for m in reloaded.model.modules())
    torch.testing.assert_close(reloaded.predict_items(task.eval_items), task.predict_items(task.eval_items),
                               rtol=0, atol=1e-5)


def test_the_row_kernels_give_the_same_codes_on_two_threads():
    from lmforge.cpu_kernels import dequant_rows, quant_rows

    x = torch.randn(300, 384, generator=torch.Generator().manual_seed(5))  # above the kernels' threading size
    acc = torch.randint(-2**20, 2**20, (300, 384), dtype=torch.int32, generator=torch.Generator().manual_seed(6))
    sw, b = torch.rand(384) + 0.5, torch.randn(384)
    before = torch.get_num_threads()
    try:
        out = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            q, s = quant_rows(x)
            out.append((q, s, dequant_rows(acc.clone(), s, sw, b, "gelu")))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*out))
