"""Runs the HTTP server: uvicorn listens at once (answering 503 while the model loads),
the engine loads in a background thread, and it is shut down when the server stops.

Shutdown (vLLM's ``--shutdown-timeout``): the first SIGTERM or SIGINT stops accepting
connections and lets running requests finish for at most ``--shutdown-timeout`` seconds; then
every request still running is ended with ``EngineShutdownError`` (a stream gets an error
event and ``[DONE]``, a plain request a 503) and the process exits. A second signal ends
everything at once.

A dead engine (its thread raised, or a tensor/pipeline-parallel worker rank died) fails every
request with ``EngineDeadError``, turns ``/health`` unhealthy, and stops the server: it exits
with status 1 once the open responses have sent their error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
from typing import Any

import uvicorn

from lmserve.engine.arg_utils import EngineArgs
from lmserve.entrypoints.frontend_flags import install_access_log_filter, uvicorn_options
from lmserve.entrypoints.openai.app import build_app
from lmserve.errors import EngineShutdownError

logger = logging.getLogger("lmserve.server")
_ABORT_GRACE_S = 5.0  # after the drain: time for ended requests to send their last bytes
_FORCE_EXIT_S = 2.0  # after a second signal: time for ended requests to send their error events
_WATCHDOG_INTERVAL_S = 0.5  # how often the server checks that its engine lives


class _Server(uvicorn.Server):
    """uvicorn's server with the shutdown contract of this module."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float, state: Any) -> None:
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        self.state = state
        self._drain: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # A signal handler: it only sets flags and hands the work to the event loop.
        loop = self._loop
        if self.should_exit:  # the second signal
            self.force_exit = True
            if loop is not None:
                loop.call_soon_threadsafe(self._exit_now)
            return
        super().handle_exit(sig, frame)
        if loop is not None:
            loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        logger.info("Shutting down: running requests have %g s to finish (--shutdown-timeout)",
                    self.shutdown_timeout)
        assert self._loop is not None
        self._drain = self._loop.call_later(
            self.shutdown_timeout, self._abort_running,
            f"The server is shutting down: the request did not finish within --shutdown-timeout "
            f"({self.shutdown_timeout:g} s).")

    def _exit_now(self) -> None:
        logger.warning("Second signal: exiting at once")
        self._abort_running("The server is shutting down now (second signal).")
        assert self._loop is not None
        self._loop.call_later(_FORCE_EXIT_S, os._exit, 1)  # if closing the connections still hangs

    def _abort_running(self, message: str) -> None:
        engine = self.state.engine
        if engine is not None and hasattr(engine, "abort_all"):
            n = engine.abort_all(EngineShutdownError(message))
            if n:
                logger.warning("Ended %d running request(s): %s", n, message)


def _load_in_thread(engine_args: EngineArgs, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """Builds the engine in a daemon thread (an interrupted start does not wait for it)."""
    future: asyncio.Future = loop.create_future()

    def work() -> None:
        try:
            from lmserve.engine.data_parallel import build_async_engine
            result: Any = build_async_engine(engine_args)
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(result))
        except BaseException as e:  # noqa: BLE001 - reported to the server loop
            err = e
            loop.call_soon_threadsafe(lambda: future.done() or future.set_exception(err))

    threading.Thread(target=work, name="lmserve-load", daemon=True).start()
    return future


async def serve(args: argparse.Namespace) -> int:
    """Serves until interrupted; returns the process exit status."""
    for line in getattr(args, "noop_flags", ()):
        logger.info("%s", line)
    engine_args = EngineArgs.from_cli_args(args)
    app = build_app(args, None)
    state = app.state.server
    shutdown_timeout = float(getattr(args, "shutdown_timeout", 0) or 0)
    config = uvicorn.Config(app, host=args.host or "0.0.0.0", port=args.port, log_level=args.uvicorn_log_level,
                            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                            ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
                            root_path=args.root_path or "", timeout_keep_alive=5, lifespan="off", http="h11",
                            h11_max_incomplete_event_size=getattr(args, "h11_max_incomplete_event_size", None),
                            timeout_graceful_shutdown=shutdown_timeout + _ABORT_GRACE_S, **uvicorn_options(args))
    install_access_log_filter(args)  # after uvicorn.Config, which (re)configures its loggers
    server = _Server(config, shutdown_timeout, state)
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
    died = asyncio.Event()

    def on_engine_dead() -> None:  # the engine thread or a worker rank died: every request has its error
        logger.error("The engine died (see above); the server exits")
        died.set()
        server.should_exit = True

    loop = asyncio.get_running_loop()
    if hasattr(engine, "add_dead_callback"):
        engine.add_dead_callback(lambda: loop.call_soon_threadsafe(on_engine_dead))
    logger.info("Model %s loaded; serving it as %s", engine.model_config.model,
                ", ".join(state.handlers.models.options.served_model_names))
    watchdog = asyncio.ensure_future(_exit_when_engine_dies(engine, server))
    try:
        await serve_task
    finally:
        watchdog.cancel()
        engine.shutdown()
        await state.aclose()
    return 1 if died.is_set() or (watchdog.done() and not watchdog.cancelled() and watchdog.result()) else 0


async def _exit_when_engine_dies(engine: Any, server: _Server) -> bool:
    """Stops the server once the engine is dead (a data-parallel replica process died): its
    requests have already failed with EngineDeadError and /health answers 503; nothing is left
    to serve, so the process exits (a supervisor restarts it), as vLLM's API server does."""
    while engine.is_running:
        await asyncio.sleep(_WATCHDOG_INTERVAL_S)
    if server.should_exit:
        return False
    logger.error("The engine is dead: shutting the server down")
    server.should_exit = True
    return True


def run_server(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0
