"""``lmforge serve MODEL_OR_RUN [--adapter RUN ...]``: an OpenAI-compatible HTTP server.

Needs the ``serve`` extra (FastAPI + uvicorn): ``pip install 'lmforge[serve]'``.
"""
from __future__ import annotations

from ..errors import LmforgeError


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LmforgeError("serve needs FastAPI and uvicorn: pip install 'lmforge[serve]'") from None
    from ..serve import ServeOptions, run_server

    opts = ServeOptions(model=args.model, adapters=list(args.adapter), embeddings=args.embeddings,
                        host=args.host, port=args.port, device=args.device, precision=args.precision,
                        max_batch=args.max_batch, max_tokens=args.max_tokens, name=args.name)
    run_server(opts)
    return 0


def register(sub) -> None:
    from .helptext import input_help

    p = sub.add_parser("serve", help="serve a model (and adapters) behind an OpenAI-compatible HTTP API")
    p.add_argument("model", help="causal LM or encoder: folder, alias (smollm2, minilm), .gguf, or run directory")
    p.add_argument("--adapter", action="append", default=[],
                   help="LoRA adapter folder or run directory, served as its own model id (repeatable)")
    p.add_argument("--embeddings", default=None,
                   help="also serve /v1/embeddings with this encoder or embed run (when MODEL is a causal LM)")
    p.add_argument("--name", default=None, help="model id of MODEL (default: its folder or alias name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (continuous batching)")
    p.add_argument("--max-tokens", type=int, default=512, help="cap on max_tokens per request")
    input_help(p, "a causal LM or encoder (folder, alias, .gguf, run); then OpenAI-style JSON requests over "
                  "HTTP",
                  '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}')
    p.set_defaults(func=cmd_serve)
