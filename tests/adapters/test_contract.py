"""The contract every adapter kind passes, on a tiny BERT classifier, a tiny Llama and tiny
encoder-decoders (T5, BART; T5 takes peft's IA3/bottleneck placements, as seq2seq sft does):
step-0 output equals the base (kinds that start as the identity), disabled equals the base
(the DPO reference), merged equals unmerged where mergeable (else merging is refused), merge
twice changes nothing, unmerge restores the base weights, save/load round-trips, and only
adapter tensors receive gradients. Adding a kind adds one line to KINDS."""
import pytest
import torch

from lmforge.adapters import (AdapterLayer, BottleneckSpec, DoraSpec, Ia3Spec, LoraSpec, PromptSpec,
                              adapter_state_dict, apply_adapter, disable_adapters, load_adapter,
                              merge_adapters, save_adapter, unmerge_adapters, unwrap_adapters)
from lmforge.adapters.registry import kind_of_spec
from lmforge.causal_lm import T5_KIND_DEFAULTS
from lmforge.errors import LmforgeError

from ._models import build, inputs, output, randomize_adapter, with_decoder

HEAD = {"bert_cls": ["classifier"], "llama": [], "t5": [], "bart": []}
ATTN = {"bert_cls": ["query", "value"], "llama": ["q_proj", "v_proj"], "t5": ["q", "v"], "bart": ["q_proj", "v_proj"]}
IA3 = {"t5": T5_KIND_DEFAULTS["ia3"]}  # the kinds' own defaults name no T5 modules
HOULSBY = {"t5": {"target_modules": T5_KIND_DEFAULTS["bottleneck"]["houlsby"]}}

# kind -> (spec for a model, starts equal to the base)
KINDS = {
    "lora": (lambda m: LoraSpec(r=4, alpha=8, target_modules=ATTN[m], modules_to_save=HEAD[m]), True),
    "rslora": (lambda m: LoraSpec(r=4, alpha=8, use_rslora=True, target_modules=ATTN[m], modules_to_save=HEAD[m]),
               True),
    "dora": (lambda m: DoraSpec(r=4, alpha=8, target_modules=ATTN[m], modules_to_save=HEAD[m]), True),
    "ia3": (lambda m: Ia3Spec(modules_to_save=HEAD[m], **IA3.get(m, {})), True),
    "prompt": (lambda m: PromptSpec(num_virtual_tokens=3, modules_to_save=HEAD[m]), False),
    "bottleneck": (lambda m: BottleneckSpec(placement="houlsby", reduction_factor=4, modules_to_save=HEAD[m],
                                            **HOULSBY.get(m, {})), True),
}
MODELS = ["bert_cls", "llama", "t5", "bart"]


@pytest.fixture(params=[(k, m) for k in KINDS for m in MODELS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    kind, model_kind = request.param
    spec = KINDS[kind][0](model_kind)
    model = build(model_kind)
    torch.manual_seed(3)
    apply_adapter(model, spec)
    return kind, model_kind, spec, model


def _mergeable(spec) -> bool:
    return kind_of_spec(spec).mergeable


def _base_weights(model):
    return {n: m.base.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def test_step0_output_equals_base(case):
    kind, mk, _, model = case
    same = torch.allclose(output(model, inputs()), output(build(mk), inputs()), atol=1e-6)
    assert same == KINDS[kind][1]  # prompt tuning changes the output from the start


def test_adapter_changes_output(case):
    _, mk, _, model = case
    randomize_adapter(model)
    assert not torch.allclose(output(model, inputs()), output(build(mk), inputs()), atol=1e-4)


def test_disable_gives_base_output(case):
    _, mk, _, model = case
    randomize_adapter(model)
    batch = inputs()
    adapted = output(model, batch)
    with disable_adapters(model):
        torch.testing.assert_close(output(model, batch), output(build(mk), batch))
    torch.testing.assert_close(output(model, batch), adapted)


def test_merged_equals_unmerged(case):
    _, _, spec, model = case
    randomize_adapter(model)
    batch = inputs()
    before = output(model, batch)
    if not _mergeable(spec):
        with pytest.raises(LmforgeError, match="cannot be merged"):
            merge_adapters(model)
        with pytest.raises(LmforgeError, match="cannot be merged"):
            unwrap_adapters(model)
        torch.testing.assert_close(output(model, batch), before)  # refused without side effects
        return
    merge_adapters(model)
    torch.testing.assert_close(output(model, batch), before, atol=1e-5, rtol=1e-5)
    with disable_adapters(model):  # the reference model works on a merged adapter too
        torch.testing.assert_close(output(model, batch), output(build(case[1]), batch), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output(model, batch), before, atol=1e-5, rtol=1e-5)


def test_merge_twice_changes_nothing_and_unmerge_restores(case):
    _, _, spec, model = case
    if not _mergeable(spec):
        pytest.skip("not mergeable (refusal tested above)")
    randomize_adapter(model)
    original = _base_weights(model)
    merge_adapters(model)
    once = _base_weights(model)
    assert any(not torch.allclose(w, original[n]) for n, w in once.items())
    merge_adapters(model)
    for name, w in _base_weights(model).items():
        assert torch.equal(w, once[name]), name
    unmerge_adapters(model)
    unmerge_adapters(model)
    for name, w in _base_weights(model).items():
        torch.testing.assert_close(w, original[name], atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(case, tmp_path):
    kind, mk, spec, model = case
    randomize_adapter(model)
    batch = inputs()
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny", task_type=None)
    fresh = build(mk)
    loaded = load_adapter(fresh, tmp_path / "adapter", kind=kind_of_spec(spec).name)
    assert type(loaded) is type(spec)
    assert torch.equal(output(fresh, batch), output(model, batch))


def test_only_adapter_tensors_get_gradients(case):
    _, _, _, model = case
    randomize_adapter(model)
    model.train()
    out = model(**with_decoder(model, inputs()))
    out.logits.float().pow(2).mean().backward()
    adapter = {t.data_ptr() for t in adapter_state_dict(model).values()}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad, "no gradient at all"
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (p.data_ptr() in adapter), name
        assert p.requires_grad == (p.data_ptr() in adapter), name
