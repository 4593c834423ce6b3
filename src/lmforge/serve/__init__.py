"""``lmforge serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the ``serve`` extra).

:func:`run_server` loads the models (:mod:`.registry`), starts the continuous-batching worker
(:mod:`.batcher`) and serves the API (:mod:`.app`) until interrupted.
"""
from __future__ import annotations

from .registry import Registry, ServeOptions, load_registry  # noqa: F401


def build(opts: ServeOptions):
    """``(app, batcher)`` for ``opts``; the batcher is started with the app and stopped with it."""
    from contextlib import asynccontextmanager

    from .app import create_app
    from .batcher import Batcher

    reg = load_registry(opts)
    batcher = Batcher(reg.generators, reg.placement, max_batch=opts.max_batch)
    app = create_app(reg, batcher, max_tokens_cap=opts.max_tokens)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app.router.lifespan_context = lifespan
    return app, batcher


def run_server(opts: ServeOptions) -> None:
    """Serve until Ctrl-C / SIGTERM."""
    import uvicorn

    from ..errors import LmforgeError

    if opts.max_batch < 1:
        raise LmforgeError("--max-batch must be >= 1")
    if not 0 < opts.port < 65536:
        raise LmforgeError(f"--port {opts.port}: not a port number")
    app, _ = build(opts)
    print(f"lmforge serve: http://{opts.host}:{opts.port}/v1 serving {', '.join(app.state.model_ids)}", flush=True)
    uvicorn.run(app, host=opts.host, port=opts.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)
