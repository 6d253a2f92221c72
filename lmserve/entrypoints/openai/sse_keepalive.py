"""``--sse-keep-alive-interval N`` (vLLM 0.32): a streamed /v1/chat/completions or /v1/completions
response that has sent nothing for N seconds (queued, in a long prefill, or between slow tokens)
gets an SSE comment line, ``: keep-alive``, which clients ignore and proxies count as traffic.

A pure ASGI middleware: it wraps ``send`` so that the comment and the response's own chunks are
never interleaved mid-message (one lock), and it sends nothing before the response's headers or
after its last chunk.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

KEEP_ALIVE = b": keep-alive\n\n"
STREAMED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class SSEKeepAliveMiddleware:
    def __init__(self, app: Any, interval: float) -> None:
        if interval <= 0:
            raise ValueError("the SSE keep-alive interval must be positive")
        self.app = app
        self.interval = interval

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if scope["type"] != "http" or path not in STREAMED_PATHS:
            await self.app(scope, receive, send)
            return
        lock = asyncio.Lock()
        state = {"streaming": False, "done": False, "last": time.monotonic()}

        async def guarded_send(message: dict) -> None:
            async with lock:
                if message["type"] == "http.response.start":
                    headers = dict(message.get("headers") or [])
                    state["streaming"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    state["done"] = True
                state["last"] = time.monotonic()
                await send(message)

        async def keep_alive() -> None:
            while not state["done"]:
                idle = time.monotonic() - state["last"]
                await asyncio.sleep(max(self.interval - idle, 0.01))
                async with lock:
                    if state["streaming"] and not state["done"] and \
                            time.monotonic() - state["last"] >= self.interval:
                        await send({"type": "http.response.body", "body": KEEP_ALIVE, "more_body": True})
                        state["last"] = time.monotonic()

        pinger = asyncio.ensure_future(keep_alive())
        try:
            await self.app(scope, receive, guarded_send)
        finally:
            pinger.cancel()
            try:
                await pinger
            except (asyncio.CancelledError, OSError, RuntimeError):
                pass  # the client went away mid-comment: the app's own send reports that
