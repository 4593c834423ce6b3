"""The rollout fast paths equal the plain paths: generation with the adapters folded into copies
of the base weights (same sampled tokens, base weights restored bit for bit), and the skipped
old-log-prob / reference forwards (same losses, KL, adapter weights and generations)."""
from __future__ import annotations

import functools
import json

import pytest
import torch

from lmforge.api import train_config
from lmforge.rl.fast import merged_adapters
from lmforge.tasks.rl import RlTask
from lmforge.train import checkpoint as ckpt

from .rl_helpers import make_rl_llama, rl_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_rl_llama(tmp_path_factory.mktemp("rl_llama"))


def test_merged_generation_samples_the_same_tokens_and_restores_the_weights(tmp_path, model_dir):
    task = RlTask(rl_config(tmp_path, model_dir, rl={"generations": 4, "rollout_prompts": 2}))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so merged and unmerged differ from the base
        for name, p in task.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    base = {n: p.detach().clone() for n, p in task.policy.named_parameters() if "lora" not in n}
    prompts = task.train_items[:6]
    task.opts.merged_generation = False
    plain = task._generate(prompts, seed=5)
    ids = torch.tensor([prompts[0]["input_ids"]])
    want = task.policy(input_ids=ids).logits
    task.opts.merged_generation = True
    fast = task._generate(prompts, seed=5)
    assert fast == plain
    with merged_adapters(task.policy) as folded:
        assert folded
        got = task.policy(input_ids=ids).logits
        with torch.no_grad():
            plain_base = task.policy.model.layers[0].self_attn.q_proj.base.weight
            assert not torch.equal(plain_base, base["model.layers.0.self_attn.q_proj.base.weight"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for n, p in task.policy.named_parameters():  # the originals, bit for bit, and the adapter path back on
        if n in base:
            assert torch.equal(p, base[n]), n
    torch.testing.assert_close(task.policy(input_ids=ids).logits, want, atol=0, rtol=0)
    assert not any(getattr(m, "merged", False) for m in task.policy.modules())


def _run(tmp_path, model_dir, name, fast, rl):
    cfg = rl_config(tmp_path, model_dir, name=name, rl={"generations": 4, "rollout_prompts": 2,
                                                        "fast_rollout": fast} | rl,
                    train={"max_steps": 4, "batch_size": 8, "lr": 2e-2})
    run = train_config(cfg)
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = [[{k: v for k, v in json.loads(line).items() if k != "kl"} for line in p.read_text().splitlines()]
               for p in sorted((run.run_dir / "samples").glob("*.jsonl"))]  # without the KL (not always logged)
    return run, [r for r in rows if r["split"] == "train"], samples


@pytest.mark.parametrize("rl, skipped", [
    ({"algorithm": "grpo", "kl_coef": 0.05}, {"old"}),        # ratio 1 by construction; the KL from the loss
    ({"algorithm": "grpo", "kl_coef": 0.0}, {"old", "ref"}),  # TRL's default: neither forward
    ({"algorithm": "rloo", "kl_coef": 0.0}, {"old", "ref"}),
])
def test_skipped_forwards_train_like_the_plain_path(tmp_path, model_dir, monkeypatch, rl, skipped):
    made = []
    orig = RlTask._token_stats

    def spy(self, items, with_values, old=True, ref=True):
        made.append((old, ref))
        return orig(self, items, with_values, old, ref)

    monkeypatch.setattr(RlTask, "_token_stats", spy)
    plain, plain_rows, plain_samples = _run(tmp_path, model_dir, "plain", False, rl)
    assert made[:4] == [(True, True)] * 4
    made.clear()
    fast, fast_rows, fast_samples = _run(tmp_path, model_dir, "fast", True, rl)
    assert made[0] == ("old" not in skipped, "ref" not in skipped)  # the fast path was taken
    assert fast_samples == plain_samples  # same generations in every rollout (so the same weights each time)
    keys = ["loss", "pg_loss", "reward_mean", "ratio_mean", "clip_fraction", "entropy", "grad_norm"]
    keys += ["kl"] if "ref" not in skipped else []
    for a, b in zip(plain_rows, fast_rows, strict=True):
        for k in keys:
            assert b[k] == pytest.approx(a[k], abs=1e-5), (k, a[k], b[k])
        if "ref" in skipped:
            assert "kl" not in b
    want = ckpt.trainable_state(plain.task.model)
    for k, v in ckpt.trainable_state(fast.task.model).items():
        torch.testing.assert_close(v, want[k], atol=1e-5, rtol=1e-4)
    trained = ckpt.trainable_state(fast.task.model)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # it trained (B starts at 0)


def test_prefill_keeps_the_last_row_by_index_and_decodes_the_same(model_dir):
    """The first decoding step passes ``logits_to_keep`` as an index tensor (a contiguous row for
    the LM head: no per-row copy of the head), later steps the int 1; the logits are the full
    forward's last position, and greedy decoding equals transformers' generate."""
    from transformers import AutoModelForCausalLM

    from lmforge.generation import GenerationConfig, _CausalSteps, decode

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[0, 5, 9, 12, 7], [3, 8, 4, 11, 6]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    seen = []
    forward = model.forward

    @functools.wraps(forward)  # the signature stays the model's (decode inspects it)
    def spy(*a, **kw):
        seen.append(kw.get("logits_to_keep"))
        return forward(*a, **kw)

    model.forward = spy
    steps = _CausalSteps(model, ids, mask, GenerationConfig(max_new_tokens=3))
    with torch.no_grad():
        got = steps.logits()
        want = forward(input_ids=ids, attention_mask=mask, position_ids=steps.positions).logits[:, -1].float()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        out = decode(model, ids, mask, GenerationConfig(max_new_tokens=6, fast_decode=False), pad_id=0)
    assert isinstance(seen[0], torch.Tensor) and seen[0].tolist() == [4]
    assert seen[2:] and all(k == 1 for k in seen[2:])  # decode: prefill by index, then one token a step
    model.forward = forward
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    assert out == ref[:, ids.shape[1]:].tolist()


def test_inverse_cdf_sampler_draws_from_the_softmax():
    """40k draws per row: frequencies within 0.01 of softmax(logits), a -inf (filtered) or zero-probability
    token never drawn, the same seed the same draws; the multinomial default is untouched."""
    from lmforge.generation import GenerationConfig, next_tokens

    p = torch.tensor([[0.1, 0.0, 0.2, 0.7], [0.25, 0.25, 0.5, 0.0]])
    logits = p.log().repeat_interleave(20000, 0)  # (40000, 4); log 0 = -inf
    cfg = GenerationConfig(temperature=1.0, sampler="inverse_cdf")
    draws = next_tokens(logits, cfg, torch.Generator().manual_seed(0))
    for row in range(2):
        got = torch.bincount(draws[row * 20000:(row + 1) * 20000], minlength=4).float() / 20000
        torch.testing.assert_close(got, p[row], atol=0.01, rtol=0)
        assert got[p[row] == 0].sum() == 0
    assert torch.equal(draws, next_tokens(logits, cfg, torch.Generator().manual_seed(0)))
    multi = GenerationConfig(temperature=1.0)
    want = torch.multinomial(logits.softmax(-1), 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    assert torch.equal(next_tokens(logits, multi, torch.Generator().manual_seed(3)), want)
