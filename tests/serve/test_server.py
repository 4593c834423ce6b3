"""`lmforge serve` driven by the official openai client against a real server on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import statistics
import time

import pytest

openai = pytest.importorskip("openai", reason="the openai client is a dev extra")
pytest.importorskip("fastapi", reason="serve needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("peft", reason="peft makes the adapters (dev extra)")

from ._server import Server, http_call, make_models, stream_then_hang_up  # noqa: E402

MAX_TOKENS = 4000
MSG = [{"role": "user", "content": "good movie , the plot was great"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("serve_models"))


@pytest.fixture(scope="module")
def server(models):
    root = models["llm"].parent
    srv = Server([str(models["llm"]), "--adapter", str(models["alpha"]), "--adapter", str(models["beta"]),
                  "--embeddings", str(models["bert"]), "--precision", "fp32", "--max-batch", "8",
                  "--max-tokens", str(MAX_TOKENS)], cwd=root)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0)


def _local(models, adapter: str | None, messages, n: int) -> tuple[str, int, list[int]]:
    """Greedy reference with transformers/peft directly: (text, prompt tokens, generated ids)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(models["llm"])
    model = LlamaForCausalLM.from_pretrained(models["llm"])
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, models[adapter])
    model.eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    gen = out[0, ids.shape[1]:].tolist()
    return tok.decode(gen, skip_special_tokens=True), ids.shape[1], gen


def test_models_lists_base_adapters_and_encoder(client):
    assert [m.id for m in client.models.list().data] == ["llm", "alpha", "beta", "bert"]


def test_chat_non_streamed_equals_transformers_greedy_with_exact_usage(client, models):
    r = client.chat.completions.create(model="llm", messages=MSG, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    text, n_prompt, _ = _local(models, None, MSG, 8)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 8, n_prompt + 8)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"


def test_chat_streamed_chunks(client):
    kw = dict(model="llm", messages=MSG, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    choice_chunks = [c for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in choice_chunks]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in choice_chunks) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(stream=True, **kw))  # no include_usage: no usage chunk
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


def test_stop_strings(client):
    kw = dict(model="llm", messages=MSG, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(max_tokens=16, **kw).choices[0].message.content
    stop = " " + full.split()[3]  # its first occurrence is after the first word
    assert full.find(stop) > 0
    want = full[:full.find(stop)]
    r = client.chat.completions.create(max_tokens=16, stop=[stop], **kw)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(max_tokens=16, stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_completions_endpoint(client, models):
    from transformers import AutoTokenizer

    n_prompt = len(AutoTokenizer.from_pretrained(models["llm"])("good movie")["input_ids"])
    r = client.completions.create(model="llm", prompt="good movie", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == n_prompt
    streamed = list(client.completions.create(model="llm", prompt="good movie", max_tokens=5, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_two_adapters_match_peft(client, models):
    outs = {}
    for name in ("llm", "alpha", "beta"):
        r = client.chat.completions.create(model=name, messages=MSG, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
        outs[name] = r.choices[0].message.content
    assert len(set(outs.values())) == 3  # each adapter changes the model
    for name in ("alpha", "beta"):
        assert outs[name] == _local(models, name, MSG, 8)[0]


def test_embeddings_float_and_base64(client, models):
    from lmforge.embeddings.encoder import SentenceEncoder

    texts = ["good movie", "awful boring plot", "the film was very superb"]
    want = SentenceEncoder.from_pretrained(models["bert"]).encode(texts, precision="fp32")
    b64 = client.embeddings.create(model="bert", input=texts)  # the client asks for base64 by default
    flt = client.embeddings.create(model="bert", input=texts, encoding_format="float")
    for resp in (b64, flt):
        got = [d.embedding for d in resp.data]
        assert [d.index for d in resp.data] == [0, 1, 2]
        assert all(len(v) == want.shape[1] for v in got)
        assert max(abs(a - b) for v, w in zip(got, want) for a, b in zip(v, w)) < 1e-5
    assert flt.usage.prompt_tokens == (2 + 2) + (3 + 2) + (5 + 2)  # words + [CLS] and [SEP] per text
    one = client.embeddings.create(model="bert", input="good movie", encoding_format="float")
    assert len(one.data) == 1


def test_bad_requests_are_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MSG)
    assert "does not exist" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llm", messages=MSG, temperature=7)
    assert e.value.status_code == 400 and "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="llm", input="x")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="bert", messages=MSG)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="llm", messages=MSG, max_tokens=MAX_TOKENS + 1)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="llm", messages=MSG, logprobs=True)
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.chat.completions.create(model="llm", messages=MSG, frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="n: only n=1"):
        client.chat.completions.create(model="llm", messages=MSG, n=2)
    status, text = http_call(server.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(text)["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in text
    status, text = http_call(server.url + "/v1/chat/completions",
                             json.dumps({"model": "llm", "messages": [{"role": 1}]}).encode())
    assert status == 400 and set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    status, text = http_call(server.url + "/v1/nothing")
    assert status == 404 and "error" in json.loads(text)


def test_batched_rows_decode_as_alone(client, server):
    """Requests that join a running batch (different prompt lengths) give their solo outputs."""
    prompts = [[{"role": "user", "content": " ".join(["good"] * k + ["plot"])}] for k in (1, 5, 2, 9, 3, 7)]
    solo = [client.chat.completions.create(model="llm", messages=p, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].message.content
            for p in prompts]
    before = server.health()["max_rows"]

    async def together():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0)
        tasks = []
        for i, p in enumerate(prompts):
            tasks.append(asyncio.create_task(ac.chat.completions.create(
                model="llm", messages=p, max_tokens=12 + 20 * (i % 2), temperature=0,
                extra_body={"ignore_eos": True})))
            await asyncio.sleep(0.005)  # later requests join mid-generation
        return await asyncio.gather(*tasks)

    got = asyncio.run(together())
    for i, (r, s) in enumerate(zip(got, solo)):
        assert r.choices[0].message.content.startswith(s) if i % 2 else r.choices[0].message.content == s
    assert server.health()["max_rows"] >= max(before, 2)


def test_disconnected_stream_frees_its_slot(server):
    before = server.health()["cancelled"]
    body = {"model": "llm", "messages": MSG, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}
    assert stream_then_hang_up("127.0.0.1", server.port, "/v1/chat/completions", body, 5) == 5
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        h = server.health()
        if h["active"] == 0 and h["cancelled"] > before:
            break
        time.sleep(0.05)
    assert h["active"] == 0 and h["cancelled"] == before + 1


def test_disconnected_plain_request_frees_its_slot(server):
    import http.client

    before = server.health()["cancelled"]
    body = {"model": "llm", "messages": MSG, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 10
    while server.health()["active"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    conn.sock.shutdown(2)  # the client gives up before the answer
    conn.close()
    while time.monotonic() < deadline:
        h = server.health()
        if h["active"] == 0 and h["cancelled"] > before:
            break
        time.sleep(0.05)
    assert h["active"] == 0 and h["cancelled"] == before + 1


def run_load(url: str, clients: int, requests: int, max_tokens: int = 16) -> dict:
    """``requests`` chat requests from ``clients`` concurrent clients; throughput and latencies."""
    async def main():
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=120, max_retries=0)
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        lat, fails, tokens = [], [], 0

        async def worker():
            nonlocal tokens
            while not queue.empty():
                i = queue.get_nowait()
                t0 = time.perf_counter()
                try:
                    r = await ac.chat.completions.create(
                        model="llm", messages=[{"role": "user", "content": f"good movie w{i % 50}"}],
                        max_tokens=max_tokens, temperature=0.7, seed=i, extra_body={"ignore_eos": True})
                    tokens += r.usage.completion_tokens
                    lat.append(time.perf_counter() - t0)
                except Exception as exc:  # counted, reported
                    fails.append(repr(exc))

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), timeout=600)
        wall = time.perf_counter() - t0
        lat.sort()
        return {"clients": clients, "requests": requests, "ok": len(lat), "failed": len(fails),
                "wall_s": round(wall, 2), "requests_per_s": round(len(lat) / wall, 2),
                "tokens_per_s": round(tokens / wall, 1), "p50_ms": round(1000 * statistics.median(lat), 1),
                "p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1), "errors": fails[:3]}

    return asyncio.run(main())


def test_load_small(server):
    stats = run_load(server.url, clients=16, requests=48)
    print("load:", json.dumps(stats))
    assert stats["failed"] == 0 and stats["ok"] == 48
    assert server.health()["max_rows"] > 1


@pytest.mark.integration
def test_load_full(server):
    """The issue's load test: 32 concurrent clients, 200 requests, all on loopback."""
    stats = run_load(server.url, clients=32, requests=200)
    print("load:", json.dumps(stats))
    assert stats["failed"] == 0 and stats["ok"] == 200


def test_adapters_share_the_base_tensors(models):
    from lmforge.serve import ServeOptions, load_registry

    reg = load_registry(ServeOptions(model=str(models["llm"]), adapters=[str(models["alpha"]), str(models["beta"])],
                                     precision="fp32"))
    base, alpha, beta = (reg.generators[k].model for k in ("llm", "alpha", "beta"))
    ptr = base.get_input_embeddings().weight.data_ptr()
    assert alpha.get_input_embeddings().weight.data_ptr() == ptr == beta.get_input_embeddings().weight.data_ptr()
    q = [m.model.layers[0].self_attn.q_proj for m in (base, alpha, beta)]
    assert type(q[0]).__name__ == "Linear" and type(q[1]).__name__ != "Linear"  # only the copies are wrapped
    base_ids = {p.data_ptr() for p in base.parameters()}
    extra = [p for p in alpha.parameters() if p.data_ptr() not in base_ids]
    assert extra and all("lora" in n for n, p in alpha.named_parameters() if p.data_ptr() not in base_ids)
