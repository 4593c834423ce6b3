"""The continuous batcher without HTTP: pure helpers (hand-computed) and batched == alone."""
from __future__ import annotations

import threading
import time

import torch

from lmforge.generation import GenerationConfig
from lmforge.serve.batcher import Batcher, GenRequest, _left_pad, cut_at_stop, held_back
from lmforge.serve.registry import _served


def test_stop_helpers_hand_computed():
    assert cut_at_stop("hello world. bye", [".", "bye"]) == ("hello world", True)
    assert cut_at_stop("hello", ["x"]) == ("hello", False)
    assert held_back("the end is ne", ["near"]) == 2  # "ne" may become "near"
    assert held_back("the end", ["near"]) == 0
    assert held_back("ab\ufffd", []) == 1  # an incomplete multi-byte character
    x = torch.ones(2, 1, 3, 4)
    y = _left_pad(x, 5)
    assert y.shape == (2, 1, 5, 4) and y[:, :, :2].abs().sum() == 0 and torch.equal(y[:, :, 2:], x)


def _run_requests(batcher, reqs, timeout=120):
    done = {id(r): threading.Event() for r in reqs}
    out = {id(r): {"text": "", "finish": None, "usage": None} for r in reqs}

    def emitter(r):
        def emit(ev):
            if ev[0] == "delta":
                out[id(r)]["text"] += ev[1]
            else:
                out[id(r)]["finish"], out[id(r)]["usage"] = ev[1], ev[2] if len(ev) > 2 else None
                done[id(r)].set()
        return emit

    for r in reqs:
        r.emit = emitter(r)
    with batcher.cond:  # the first three are admitted together
        for r in reqs[:3]:
            batcher.submit(r)
    for r in reqs[3:]:
        time.sleep(0.005)  # the rest join a running batch (or the next one)
        batcher.submit(r)
    for r in reqs:
        assert done[id(r)].wait(timeout)
    return [out[id(r)] for r in reqs]


def test_batched_rows_equal_solo_generation(tiny_llama_dir):
    from lmforge.device import Placement
    from lmforge.merge import load_causal_lm, resolve_source

    model, tok, _ = load_causal_lm(resolve_source(str(tiny_llama_dir)))
    served = _served(model, tok)
    batcher = Batcher({"m": served}, Placement.resolve("cpu", "fp32"), max_batch=3)
    batcher.start()
    try:
        prompts = ["good movie", "the plot was very dull and the actor was bad", "w1 w2", "superb film",
                   "a b c d e f"]
        lengths = [7, 12, 5, 9, 3]
        reqs = [GenRequest(model="m", prompt_ids=tok(p)["input_ids"], max_tokens=n,
                           cfg=GenerationConfig(max_new_tokens=n), emit=None, ignore_eos=True)
                for p, n in zip(prompts, lengths)]
        got = _run_requests(batcher, reqs)
        for p, n, g in zip(prompts, lengths, got):
            ids = tok(p)["input_ids"]
            want = tok.decode(_solo(model, ids, n), skip_special_tokens=True)
            assert g["text"] == want and g["finish"] == "length"
            assert g["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
        assert batcher.stats["max_rows"] == 3  # rows were batched up to the limit
        text = got[0]["text"]
        word = " " + text.split()[2]
        stop = GenRequest(model="m", prompt_ids=tok("good movie")["input_ids"], max_tokens=12,
                          cfg=GenerationConfig(max_new_tokens=12, stop=[word]), emit=None, ignore_eos=True)
        (res,) = _run_requests(batcher, [stop])
        assert res["finish"] == "stop" and res["text"] == text[:text.find(word)]
    finally:
        batcher.stop()


@torch.no_grad()
def _solo(model, ids, n):
    """Greedy ids with a plain loop and no cache (the reference)."""
    x = torch.tensor([ids])
    out = []
    for _ in range(n):
        nxt = int(model(input_ids=x).logits[0, -1].argmax())
        out.append(nxt)
        x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return out
