"""Runs the HTTP server: uvicorn listens at once (answering 503 while the model loads),
the engine loads in a background thread, and it is shut down when the server stops."""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from typing import Any

import uvicorn

from lmserve.engine.arg_utils import EngineArgs
from lmserve.entrypoints.openai.app import build_app

logger = logging.getLogger("lmserve.server")


def _load_in_thread(engine_args: EngineArgs, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """Builds the engine in a daemon thread (an interrupted start does not wait for it)."""
    future: asyncio.Future = loop.create_future()

    def work() -> None:
        try:
            from lmserve.engine.async_engine import AsyncLLM
            result: Any = AsyncLLM.from_engine_args(engine_args)
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(result))
        except BaseException as e:  # noqa: BLE001 - reported to the server loop
            err = e
            loop.call_soon_threadsafe(lambda: future.done() or future.set_exception(err))

    threading.Thread(target=work, name="lmserve-load", daemon=True).start()
    return future


async def serve(args: argparse.Namespace) -> int:
    """Serves until interrupted; returns the process exit status."""
    engine_args = EngineArgs.from_cli_args(args)
    app = build_app(args, None)
    state = app.state.server
    config = uvicorn.Config(app, host=args.host or "0.0.0.0", port=args.port, log_level=args.uvicorn_log_level,
                            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                            ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
                            root_path=args.root_path or "", timeout_keep_alive=5, lifespan="off")
    server = uvicorn.Server(config)
    serve_task = asyncio.ensure_future(server.serve())
    load = _load_in_thread(engine_args, asyncio.get_running_loop())
    done, _ = await asyncio.wait({serve_task, load}, return_when=asyncio.FIRST_COMPLETED)
    if load not in done:  # the server stopped (interrupted, or could not bind) before the model loaded
        return 0 if server.started else 1
    try:
        engine = load.result()
    except Exception as e:  # noqa: BLE001 - a clear message, not a traceback, for a bad model path
        logger.error("Failed to load the model: %s", e)
        logger.debug("Model load failure", exc_info=True)
        server.should_exit = True
        await serve_task
        return 1
    state.set_engine(engine)
    logger.info("Model %s loaded; serving it as %s", engine.model_config.model,
                ", ".join(state.handlers.models.options.served_model_names))
    try:
        await serve_task
    finally:
        engine.shutdown()
    return 0


def run_server(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0
