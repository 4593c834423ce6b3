"""Seq2seq generation: our loop (encoder once, decoder with the KV cache) against transformers' generate."""
from __future__ import annotations

import pytest
import torch

from lmforge.generation import GenerationConfig, decode, generate

from ._tiny import BUILD, make_folder


def _batch(seed: int = 3):
    """Three left-padded prompts of 4-7 tokens (ids 4..99)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 6]
    ids = torch.ones(3, 7, dtype=torch.long)  # padding id 1 (left)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, 7 - n:] = torch.randint(4, 100, (n,), generator=g)
        mask[r, 7 - n:] = 1
    return ids, mask


def _hf_generate(model, ids, mask, **kw):
    """transformers' generate on the same prompts, right-padded (as its encoders expect), tokens only."""
    order = torch.sort(1 - mask, dim=1, stable=True).indices
    out = model.generate(input_ids=ids.gather(1, order), attention_mask=mask.gather(1, order), **kw)
    return [row[1:].tolist() for row in out]  # drop the decoder start token


def _trim(rows, eos, pad):
    out = []
    for r in rows:
        r = list(r)
        if eos in r:
            r = r[:r.index(eos) + 1]
        while r and r[-1] == pad and eos not in r:
            r.pop()
        out.append(r)
    return out


@pytest.mark.parametrize("kind", ["t5", "flan", "bart"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_transformers_generate(kind, use_cache):
    model = BUILD[kind]()
    ids, mask = _batch()
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    ours = decode(model, ids, mask, GenerationConfig(max_new_tokens=12, use_cache=use_cache), eos_ids=[eos], pad_id=pad)
    theirs = _hf_generate(model, ids, mask, max_new_tokens=12, do_sample=False, num_beams=1)
    assert _trim(ours, eos, pad) == _trim(theirs, eos, pad)
    assert all(len(r) > 1 for r in ours)  # the test decodes more than one step


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_repetition_penalty_equals_transformers(kind):
    model = BUILD[kind]()
    ids, mask = _batch(5)
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    cfg = GenerationConfig(max_new_tokens=10, repetition_penalty=1.8)
    ours = decode(model, ids, mask, cfg, eos_ids=[eos], pad_id=pad)
    theirs = _hf_generate(model, ids, mask, max_new_tokens=10, do_sample=False, repetition_penalty=1.8)
    assert _trim(ours, eos, pad) == _trim(theirs, eos, pad)
    plain = decode(model, ids, mask, GenerationConfig(max_new_tokens=10), eos_ids=[eos], pad_id=pad)
    assert plain != ours  # the penalty changed something (the test can fail)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_sampling_equals_transformers_with_the_same_seed(kind):
    """Temperature, top-k and top-p in transformers' order; one multinomial draw per step from the
    global generator, as transformers draws."""
    model = BUILD[kind]()
    ids, mask = _batch(7)
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    torch.manual_seed(11)
    ours = decode(model, ids, mask, GenerationConfig(max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9),
                  eos_ids=[eos], pad_id=pad)
    torch.manual_seed(11)
    theirs = _hf_generate(model, ids, mask, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    assert _trim(ours, eos, pad) == _trim(theirs, eos, pad)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_cache_and_no_cache_sample_the_same(kind):
    model = BUILD[kind]()
    ids, mask = _batch(9)
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    runs = []
    for use_cache in (True, False):
        cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=4, use_cache=use_cache)
        runs.append(decode(model, ids, mask, cfg, eos_ids=[eos], pad_id=pad,
                           generator=torch.Generator().manual_seed(4)))
    assert runs[0] == runs[1]


def test_the_encoder_runs_once_with_the_cache(tmp_path):
    model = BUILD["t5"]()
    calls = []
    model.get_encoder().register_forward_hook(lambda *a: calls.append(1))
    ids, mask = _batch()
    decode(model, ids, mask, GenerationConfig(max_new_tokens=6), eos_ids=[], pad_id=0)
    assert len(calls) == 1


def test_text_generation_with_stop_strings_and_padding_alone_equals_batched(tmp_path):
    from lmforge.models import load_tokenizer

    folder = make_folder("t5", tmp_path / "t5")
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    tok = load_tokenizer(folder)
    prompts = ["good movie and a great plot", "bad film", "the story was very dull but the actor was fine"]
    cfg = GenerationConfig(max_new_tokens=6, batch_size=3)
    batched = generate(model, tok, prompts, cfg)
    alone = [generate(model, tok, [p], GenerationConfig(max_new_tokens=6))[0] for p in prompts]
    assert batched == alone and all(isinstance(t, str) for t in batched)
    first = batched[0].split()
    if len(first) >= 2:
        cut = generate(model, tok, prompts[:1], GenerationConfig(max_new_tokens=6, stop=[first[1]]))[0]
        assert first[1] not in cut


@pytest.mark.parametrize("kind", ["t5", "flan", "bart"])
def test_response_hidden_and_head_give_the_models_token_log_probs(kind):
    """What an RL task needs of a seq2seq policy: per-token log-probs of sampled responses."""
    from lmforge.causal_lm import seq2seq_head, seq2seq_response_hidden

    model = BUILD[kind]()
    ids, mask = _batch(2)
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    out = decode(model, ids, mask, GenerationConfig(max_new_tokens=6, temperature=1.0, seed=0), eos_ids=[eos],
                 pad_id=pad, generator=torch.Generator().manual_seed(0))
    width = max(len(o) for o in out)
    resp = torch.full((len(out), width), -100, dtype=torch.long)
    for r, o in enumerate(out):
        resp[r, :len(o)] = torch.tensor(o)
    with torch.no_grad():
        h = seq2seq_response_hidden(model, ids, mask, resp, pad)  # (B, L, H)
        w, b, _ = seq2seq_head(model)
        ours = torch.log_softmax(h @ w.T + (0 if b is None else b), -1)
        order = torch.sort(1 - mask, dim=1, stable=True).indices
        labels = resp.clone()
        ref = model(input_ids=ids.gather(1, order), attention_mask=mask.gather(1, order), labels=labels).logits
        ref = torch.log_softmax(ref, -1)
    real = resp >= 0
    pick = lambda z: z.gather(-1, resp.clamp_min(0)[..., None]).squeeze(-1)[real]  # noqa: E731
    torch.testing.assert_close(pick(ours), pick(ref), atol=1e-5, rtol=1e-5)
