"""The OpenAI-compatible HTTP API (FastAPI): models, chat completions, completions, embeddings.

- ``GET /v1/models``: the base, each adapter and each encoder as a model id.
- ``POST /v1/chat/completions``: the tokenizer's chat template; ``temperature``, ``top_p``,
  ``top_k``, ``seed``, ``stop``, ``max_tokens``/``max_completion_tokens``, and vLLM's extras
  ``repetition_penalty`` and ``ignore_eos``; options it cannot honour (``logprobs``, ``tools``,
  ``n`` > 1, presence/frequency penalties ...) are a 400, never silently ignored; ``stream: true`` sends server-sent events: the role in the first delta, the same
  id on every chunk, ``finish_reason`` only on the last choice chunk, then (with
  ``stream_options.include_usage``) a chunk with empty ``choices`` and the exact token usage.
- ``POST /v1/completions``: the same for a raw prompt.
- ``POST /v1/embeddings``: ``input`` a text or a list of texts, ``encoding_format`` ``float`` or
  ``base64`` (little-endian float32, what the official client asks for by default).

Errors are ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for anything
the client sent, never a stack trace. A streaming client that disconnects cancels its request;
the batcher drops its row at the next step (a non-streamed request is checked once a second).
"""
from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import LmforgeError
from ..generation import GenerationConfig, render_chat
from .batcher import Batcher, GenRequest, async_emitter
from .registry import Registry


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False


class ChatRequest(_Sampling):
    messages: list[dict] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


def error_body(exc: ApiError) -> dict:
    return {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}}


def _content(m: dict, i: int) -> dict:
    """OpenAI message -> ``{"role", "content"}`` with text content (parts joined)."""
    role, content = m.get("role"), m.get("content")
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", f"messages[{i}]")
            parts.append(p["text"])
        content = "".join(parts)
    if not isinstance(role, str) or not isinstance(content, str):
        raise ApiError(400, f"messages[{i}] needs a text 'role' and 'content'", f"messages[{i}]")
    return {"role": role, "content": content}


def create_app(reg: Registry, batcher: Batcher, max_tokens_cap: int = 512):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    app.state.model_ids = reg.ids()

    @app.exception_handler(ApiError)
    async def _api_error(_req, exc: ApiError):
        return JSONResponse(error_body(exc), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(ApiError(400, "the request body is not valid JSON")), status_code=400)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(ApiError(400, msg, where or None)), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_req, exc: HTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(ApiError(exc.status_code, str(exc.detail), code=code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(_req, exc: Exception):  # no stack trace goes to the client
        return JSONResponse(error_body(ApiError(500, f"internal error ({type(exc).__name__})", kind="server_error")),
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": reg.ids()} | batcher.health()

    @app.get("/v1/models")
    async def models():
        data = [{"id": m, "object": "model", "created": created, "owned_by": "lmforge"} for m in reg.ids()]
        return {"object": "list", "data": data}

    def _generator(name: str):
        if name in reg.generators:
            return reg.generators[name]
        if name in reg.encoders:
            raise ApiError(400, f"model '{name}' is an embedding model; use /v1/embeddings", "model")
        raise ApiError(404, f"The model '{name}' does not exist (serving: {', '.join(reg.ids())})", "model",
                       "model_not_found")

    def _prepare(body: _Sampling, prompt_ids: list[int], served) -> GenRequest:
        if body.n != 1:
            raise ApiError(400, "n: only n=1 is supported", "n")
        extra = body.model_extra or {}
        for key in ("logprobs", "top_logprobs", "tools", "functions", "response_format", "logit_bias"):
            if extra.get(key) not in (None, False, [], {}) and not (key == "response_format" and
                                                                   extra[key] == {"type": "text"}):
                raise ApiError(400, f"{key}: not supported by this server", key)
        for key in ("presence_penalty", "frequency_penalty"):
            if extra.get(key) not in (None, 0, 0.0):
                raise ApiError(400, f"{key}: not supported (use repetition_penalty)", key)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: up to 4 non-empty strings", "stop")
        want = body.max_completion_tokens or body.max_tokens or max_tokens_cap
        if want > max_tokens_cap:
            raise ApiError(400, f"max_tokens: at most {max_tokens_cap} on this server", "max_tokens")
        if served.max_positions and len(prompt_ids) >= served.max_positions:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the model's context is "
                                f"{served.max_positions}", "messages")
        try:
            cfg = GenerationConfig(max_new_tokens=want, temperature=body.temperature, top_k=body.top_k,
                                   top_p=body.top_p, repetition_penalty=body.repetition_penalty, stop=stops,
                                   seed=body.seed)
        except LmforgeError as exc:
            raise ApiError(400, str(exc)) from None
        return GenRequest(model=body.model, prompt_ids=prompt_ids, max_tokens=want, cfg=cfg, emit=lambda e: None,
                          ignore_eos=body.ignore_eos)

    async def _run(req: GenRequest, body: _Sampling, kind: str, http: Request):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        req.emit = async_emitter(loop, queue)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        batcher.submit(req)
        if not body.stream:
            text, finish, usage = [], None, None
            checked = time.monotonic()
            try:
                while True:
                    try:
                        ev = await asyncio.wait_for(queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        ev = None
                    if time.monotonic() - checked >= 1.0:
                        checked = time.monotonic()
                        if await http.is_disconnected():  # the client left: free the row, answer no one
                            return JSONResponse({}, status_code=499)
                    if ev is None:
                        continue
                    if ev[0] == "delta":
                        text.append(ev[1])
                    elif ev[0] == "done":
                        finish, usage = ev[1], ev[2]
                        break
                    else:
                        raise ApiError(500, ev[1], kind="server_error")
            finally:
                req.cancelled.set()  # no-op when finished; frees the slot if the client left
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                          "logprobs": None, "finish_reason": finish}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            return JSONResponse({"id": rid, "object": obj, "created": now, "model": body.model,
                                 "choices": [choice], "usage": usage})
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta: dict | None, finish: str | None, usage=None, choices=True) -> str:
            if kind == "chat":
                ch = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
            else:
                ch = {"index": 0, "text": (delta or {}).get("content", ""), "logprobs": None, "finish_reason": finish}
            out = {"id": rid, "object": obj, "created": now, "model": body.model, "choices": [ch] if choices else []}
            if include_usage:
                out["usage"] = usage
            return f"data: {json.dumps(out)}\n\n"

        async def events():
            try:
                if kind == "chat":
                    yield chunk({"role": "assistant", "content": ""}, None)
                while True:
                    ev = await queue.get()
                    if ev[0] == "delta":
                        yield chunk({"content": ev[1]}, None)
                    elif ev[0] == "done":
                        yield chunk({}, ev[1])
                        if include_usage:
                            yield chunk(None, None, ev[2], choices=False)
                        break
                    else:
                        yield f"data: {json.dumps(error_body(ApiError(500, ev[1], kind='server_error')))}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                req.cancelled.set()  # a client that went away frees its row at the next step

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        served = _generator(body.model)
        messages = [_content(m, i) for i, m in enumerate(body.messages)]
        try:
            text = render_chat(served.tokenizer, messages)
        except LmforgeError as exc:
            raise ApiError(400, str(exc), "messages") from None
        except Exception as exc:  # a template that rejects the conversation (roles out of order ...)
            raise ApiError(400, f"messages: the chat template rejected them ({exc})", "messages") from None
        ids = served.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ApiError(400, "messages: the conversation encodes to no tokens", "messages")
        return await _run(_prepare(body, list(ids), served), body, "chat", http)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        served = _generator(body.model)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request", "prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "prompt: empty", "prompt")
        ids = served.tokenizer(prompt)["input_ids"]
        return await _run(_prepare(body, list(ids), served), body, "completion", http)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        enc = reg.encoders.get(body.model)
        if enc is None:
            if body.model in reg.generators:
                raise ApiError(400, f"model '{body.model}' generates text; serve an encoder or embed run "
                                    f"(lmforge serve ... --embeddings MODEL)", "model")
            raise ApiError(404, f"The model '{body.model}' does not exist (serving: {', '.join(reg.ids())})",
                           "model", "model_not_found")
        texts = _texts(body.input, enc)
        if body.dimensions is not None and body.dimensions != enc.dim:
            raise ApiError(400, f"dimensions: this model gives {enc.dim}", "dimensions")
        vectors, n_tokens = await asyncio.to_thread(_encode, enc, texts, reg.placement)
        data = []
        for i, v in enumerate(vectors):
            emb: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                        else [float(x) for x in v])
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return app


def _texts(value, enc) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not value:
        raise ApiError(400, "input: empty", "input")
    if all(isinstance(v, int) for v in value):  # one token-id array
        value = [value]
    out = []
    for i, v in enumerate(value):
        if isinstance(v, list):  # token ids: decode them with the model's tokenizer
            if not v or not all(isinstance(t, int) and 0 <= t < len(enc.tokenizer) for t in v):
                raise ApiError(400, f"input[{i}]: token ids must be in [0, {len(enc.tokenizer)})", "input")
            v = enc.tokenizer.decode(v, skip_special_tokens=True)
        if not isinstance(v, str) or not v:
            raise ApiError(400, f"input[{i}]: empty text", "input")
        out.append(v)
    return out


_ENCODE_LOCK = threading.Lock()


def _encode(enc, texts: list[str], placement):
    """Embed in the worker thread pool (one encode at a time per process)."""
    with _ENCODE_LOCK:
        n_tokens = sum(len(ids) for ids in enc.tokenize(texts))
        return enc.encode(texts, placement=placement, batch_size=64), n_tokens
