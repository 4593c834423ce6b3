"""Decoding: logits processors against hand-computed values and transformers' processors; greedy
parity (cache == no cache == transformers' generate); batching, stop strings, EOS, seeds, streaming."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.errors import LmforgeError
from lmforge.generation import (GenerationConfig, decode, encode_prompts, generate, next_tokens,
                                process_logits, repetition_penalty, seen_tokens, temperature_scale,
                                top_k_filter, top_p_filter)
from lmforge.models import load_tokenizer

INF = float("-inf")
PROMPTS = ["the movie was good", "a very dull plot and the actor is bad but it was fine", "w1 w2"]


def spread_weights(model, seed: int = 1, std: float = 0.3):
    """Re-draw the weights with a larger spread: the default init makes a tiny model repeat one
    token forever, which would make every parity check trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    model = spread_weights(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)).eval()
    return model, load_tokenizer(tiny_llama_dir)


# ---- processors -------------------------------------------------------------------------------------
def test_temperature_hand_computed():
    out = temperature_scale(torch.tensor([[1.0, 2.0, -3.0]]), 2.0)
    assert torch.equal(out, torch.tensor([[0.5, 1.0, -1.5]]))


def test_top_k_hand_computed():
    out = top_k_filter(torch.tensor([[1.0, 5.0, 3.0, 4.0], [2.0, 2.0, 1.0, 0.0]]), 2)
    assert torch.equal(out, torch.tensor([[INF, 5.0, INF, 4.0], [2.0, 2.0, INF, INF]]))
    same = torch.tensor([[1.0, 2.0]])
    assert torch.equal(top_k_filter(same, 0), same) and torch.equal(top_k_filter(same, 5), same)


@pytest.mark.parametrize("p, kept", [(0.4, 1), (0.75, 2), (0.85, 3), (0.97, 4), (1.0, 4)])
def test_top_p_hand_computed(p, kept):
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    out = top_p_filter(probs.log(), p)
    keep_order = [1, 3, 2, 0][:kept]
    expected = torch.full_like(probs, INF)
    expected[0, keep_order] = probs.log()[0, keep_order]
    assert torch.equal(out, expected)


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert torch.equal(repetition_penalty(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    assert torch.equal(repetition_penalty(logits, seen, 1.0), logits)


def test_seen_tokens_ignores_padding():
    ids = torch.tensor([[0, 2, 2], [1, 3, 0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    expected = torch.tensor([[False, False, True, False], [True, True, False, True]])
    assert torch.equal(seen_tokens(ids, mask, 4), expected)


def test_processors_match_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    ids = torch.randint(0, 50, (4, 7), generator=g)
    seen = seen_tokens(ids, torch.ones_like(ids), 50)
    assert torch.allclose(repetition_penalty(logits, seen, 1.3),
                          RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))
    assert torch.allclose(temperature_scale(logits, 0.7), TemperatureLogitsWarper(0.7)(ids, logits.clone()))
    assert torch.equal(top_k_filter(logits, 5), TopKLogitsWarper(5)(ids, logits.clone()))
    for p in (0.3, 0.6, 0.9):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(ids, logits.clone()))


def test_greedy_ignores_sampling_settings():
    logits = torch.tensor([[0.1, 3.0, 2.0]])
    cfg = GenerationConfig(temperature=0.0, top_k=1, top_p=0.1)
    assert torch.equal(process_logits(logits, None, cfg), logits)
    assert next_tokens(logits, cfg).tolist() == [1]
    sampled = GenerationConfig(temperature=1.0, top_k=1)  # top-1 sampling is argmax
    gen = torch.Generator().manual_seed(0)
    assert all(next_tokens(process_logits(logits, None, sampled), sampled, gen).item() == 1 for _ in range(20))


@pytest.mark.parametrize("kwargs, words", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"), ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"stop": [""]}, "stop"),
])
def test_bad_config_is_one_line(kwargs, words):
    with pytest.raises(LmforgeError, match=words) as err:
        GenerationConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_empty_prompt_rejected(lm):
    model, tok = lm
    with pytest.raises(LmforgeError, match="prompt 2 is empty"):
        generate(model, tok, ["the movie", "  "], GenerationConfig(max_new_tokens=2))


# ---- decoding with a model --------------------------------------------------------------------------
def _ids(tok, text):
    ids = torch.tensor([tok(text)["input_ids"]])
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_parity_cache_nocache_transformers(lm, penalty):
    model, tok = lm
    for text in PROMPTS:
        ids, mask = _ids(tok, text)
        cached = decode(model, ids, mask, GenerationConfig(max_new_tokens=24, repetition_penalty=penalty), eos_ids=[3])
        fresh = decode(model, ids, mask, GenerationConfig(max_new_tokens=24, repetition_penalty=penalty,
                                                          use_cache=False), eos_ids=[3])
        hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                            repetition_penalty=penalty, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert cached == fresh
        assert cached[0] == hf[:len(cached[0])]
        assert len(set(cached[0])) > 3  # a non-trivial sequence


def test_batched_left_padded_equals_one_by_one_and_transformers(lm):
    model, tok = lm
    cfg = GenerationConfig(max_new_tokens=20, batch_size=3)
    one = [generate(model, tok, [p], cfg, chat=False)[0] for p in PROMPTS]
    assert generate(model, tok, PROMPTS, cfg, chat=False) == one
    assert generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=20, use_cache=False), chat=False) == one
    enc = [tok(p)["input_ids"] for p in PROMPTS]
    width = max(map(len, enc))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in enc])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(e) for e in enc])[:, None]).long()
    hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=0)
    assert [tok.decode(r[width:], skip_special_tokens=True) for r in hf] == one


def test_eos_ends_a_row(lm):
    model, tok = lm
    ids, mask = _ids(tok, PROMPTS[1])
    full = decode(model, ids, mask, GenerationConfig(max_new_tokens=20))[0]
    eos = full[6]
    cut = decode(model, ids, mask, GenerationConfig(max_new_tokens=20), eos_ids=[eos])[0]
    assert cut == full[:full.index(eos) + 1]


def test_stop_strings_truncate(lm):
    model, tok = lm
    full = generate(model, tok, [PROMPTS[0]], GenerationConfig(max_new_tokens=20), chat=False)[0]
    stop = full.split()[4]
    out = generate(model, tok, [PROMPTS[0]], GenerationConfig(max_new_tokens=20, stop=["zzz", stop]), chat=False)[0]
    assert out == full[:full.index(stop)]
    assert stop not in out and len(out) < len(full)


def test_stream_pieces_join_to_the_result(lm):
    model, tok = lm
    full = generate(model, tok, [PROMPTS[0]], GenerationConfig(max_new_tokens=12), chat=False)[0]
    stop = full.split()[6]
    pieces: list[str] = []
    out = generate(model, tok, [PROMPTS[0]], GenerationConfig(max_new_tokens=12, stop=[stop]), chat=False,
                   stream=pieces.append)[0]
    assert len(pieces) > 2 and "".join(pieces) == out and stop not in out
    with pytest.raises(LmforgeError, match="single prompt"):
        generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=2), stream=pieces.append)


def test_seed_reproducibility_and_cache_independence(lm):
    model, tok = lm

    def run(seed, cache=True):
        cfg = GenerationConfig(max_new_tokens=16, temperature=1.0, top_k=30, top_p=0.95, seed=seed, use_cache=cache)
        return generate(model, tok, PROMPTS, cfg)

    first = run(7)
    assert run(7) == first
    assert run(7, cache=False) == first  # same logits, same draws
    assert run(8) != first


def test_chat_template_applied_unless_raw(lm):
    model, tok = lm
    messages = [{"role": "user", "content": "the movie"}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert encode_prompts(tok, ["the movie"], chat=True)[0] == tok(expected, add_special_tokens=False)["input_ids"]
    assert encode_prompts(tok, [messages], chat=False) == encode_prompts(tok, ["the movie"], chat=True)
    assert encode_prompts(tok, ["the movie"], chat=False)[0] == tok("the movie")["input_ids"]
    cfg = GenerationConfig(max_new_tokens=8)
    assert generate(model, tok, ["the movie"], cfg) == generate(model, tok, [messages], cfg)
    assert generate(model, tok, ["the movie"], cfg) != generate(model, tok, ["the movie"], cfg, chat=False)


def test_prompt_longer_than_the_context_is_refused_and_generation_capped(lm, caplog):
    model, tok = lm
    limit = model.config.max_position_embeddings  # 128
    too_long = " ".join(["movie"] * limit)  # no room for a new token
    n = len(encode_prompts(tok, [too_long], chat=False)[0])
    with pytest.raises(LmforgeError, match=f"prompt 2 has {n} tokens; the model takes at most {limit}") as err:
        generate(model, tok, ["w1 w2", too_long], GenerationConfig(max_new_tokens=4), chat=False)
    assert n >= limit and "\n" not in str(err.value)
    near = " ".join(["w1", "w2", "the", "plot"] * 31)  # 124 words
    ids = encode_prompts(tok, [near], chat=False)[0]
    room = limit - len(ids)
    assert 0 < room < 50
    out = decode(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                 GenerationConfig(max_new_tokens=room))[0]
    with caplog.at_level("WARNING", logger="lmforge"):
        text = generate(model, tok, [near], GenerationConfig(max_new_tokens=50), chat=False)[0]
    assert len(out) == room and f"capped at {room} new tokens" in caplog.text
    assert text == tok.decode(out, skip_special_tokens=True)


def test_decoding_uses_no_deprecated_cache_argument(lm):
    import warnings

    model, tok = lm
    ids, mask = _ids(tok, PROMPTS[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        decode(model, ids, mask, GenerationConfig(max_new_tokens=3))
