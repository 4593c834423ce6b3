"""The contract every adapter passes: merge == unmerged, idempotent merge, exact unmerge,
disable == base, save/load round-trip. Parametrised over tiny BERT and Llama, rsLoRA on/off."""
import pytest
import torch

from lmforge.adapters import (LoraLinear, LoraSpec, apply_lora, disable_lora, load_adapter,
                              merge_lora, save_adapter, unmerge_lora)

from ._models import build, inputs, output, randomize_adapter

CASES = {
    "bert_cls": dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
    "llama": dict(target_modules=["q_proj", "v_proj"]),
}


@pytest.fixture(params=[(k, rs) for k in CASES for rs in (False, True)],
                ids=lambda p: f"{p[0]}-{'rslora' if p[1] else 'lora'}")
def case(request):
    kind, rslora = request.param
    spec = LoraSpec(r=4, alpha=8, use_rslora=rslora, **CASES[kind])
    model = build(kind)
    apply_lora(model, spec)
    randomize_adapter(model)
    return kind, spec, model


def _base_weights(model):
    return {n: m.base.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, LoraLinear)}


def test_adapter_changes_output(case):
    kind, _, model = case
    assert not torch.allclose(output(model, inputs()), output(build(kind), inputs()))


def test_merged_equals_unmerged(case):
    _, _, model = case
    batch = inputs()
    before = output(model, batch)
    merge_lora(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoraLinear))
    torch.testing.assert_close(output(model, batch), before, atol=1e-5, rtol=1e-5)


def test_merge_twice_is_idempotent(case):
    _, _, model = case
    merge_lora(model)
    once = _base_weights(model)
    merge_lora(model)
    for name, w in _base_weights(model).items():
        assert torch.equal(w, once[name]), name


def test_unmerge_restores_base_weights(case):
    _, _, model = case
    original = _base_weights(model)
    merge_lora(model)
    assert any(not torch.allclose(w, original[n]) for n, w in _base_weights(model).items())
    unmerge_lora(model)
    unmerge_lora(model)  # a second unmerge is a no-op
    for name, w in _base_weights(model).items():
        torch.testing.assert_close(w, original[name], atol=1e-6, rtol=0)


def test_disable_gives_base_output(case):
    kind, _, model = case
    batch = inputs()
    adapted = output(model, batch)
    with disable_lora(model):
        torch.testing.assert_close(output(model, batch), output(build(kind), batch))
    torch.testing.assert_close(output(model, batch), adapted)


def test_save_load_round_trip(case, tmp_path):
    kind, spec, model = case
    batch = inputs()
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny", task_type=None)
    fresh = build(kind)
    loaded_spec = load_adapter(fresh, tmp_path / "adapter")
    assert loaded_spec == spec
    assert torch.equal(output(fresh, batch), output(model, batch))
