"""Plumbing between engine output streams and HTTP responses.

``OutputMerger`` runs each engine stream as a task and hands out ``(stream index, output)``
pairs in arrival order. ``start()`` lets every stream reach the engine once, so a request
the engine refuses (ValueError, overload) raises *before* the HTTP response starts and can
be answered with a proper status code; later failures arrive in-band.

``SSEResponse`` always closes its body iterator, even when the client vanished before the
first chunk, so no engine request outlives its HTTP request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.responses import StreamingResponse

_DONE = object()


class OutputMerger:
    """Invariant: after ``aclose()`` (or exhaustion) no stream task is left running, and
    every stream's generator has been closed (which aborts its engine request)."""

    def __init__(self, streams: list[AsyncIterator[Any]]) -> None:
        self._streams = streams
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._remaining = len(streams)
        self._closed = False

    async def _drain(self, i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async with aclosing(stream) as s:  # type: ignore[type-var]
                async for item in s:
                    self._queue.put_nowait((i, item))
            self._queue.put_nowait((i, _DONE))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait((i, e))

    async def start(self) -> None:
        """Starts every stream; raises the first refusal that happened before any output."""
        self._tasks = [asyncio.ensure_future(self._drain(i, s)) for i, s in enumerate(self._streams)]
        for _ in range(2):
            await asyncio.sleep(0)
        early: list[tuple[int, Any]] = []
        while not self._queue.empty():
            early.append(self._queue.get_nowait())
        for _, item in early:
            if isinstance(item, BaseException):
                await self.aclose()
                raise item
        for entry in early:
            self._queue.put_nowait(entry)

    async def __aenter__(self) -> "OutputMerger":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> "OutputMerger":
        return self

    async def __anext__(self) -> tuple[int, Any]:
        while self._remaining > 0:
            i, item = await self._queue.get()
            if item is _DONE:
                self._remaining -= 1
                continue
            if isinstance(item, BaseException):
                await self.aclose()
                raise item
            return i, item
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        pending = [t for t in self._tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            try:
                await asyncio.gather(*pending, return_exceptions=True)
            except asyncio.CancelledError:  # we are being cancelled too: the tasks still end
                pass


class SSEResponse(StreamingResponse):
    """``text/event-stream`` response that closes its body iterator in every case."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str] | None = None,
                 cleanup: Any = None) -> None:
        super().__init__(content, headers=headers, media_type="text/event-stream")
        self._cleanup = cleanup  # an object with ``aclose()`` closed after the body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except (RuntimeError, asyncio.CancelledError):
                    pass
            if self._cleanup is not None:
                await self._cleanup.aclose()


def should_include_usage(stream_options: Any, force: bool) -> tuple[bool, bool]:
    """(a final usage chunk, usage on every chunk) for a stream, as vLLM decides them: the request's
    ``stream_options.include_usage``, or always with ``--enable-force-include-usage``; per-chunk
    usage only with ``continuous_usage_stats`` on top of that."""
    include = force or bool(stream_options is not None and stream_options.include_usage)
    return include, include and bool(stream_options is not None and stream_options.continuous_usage_stats)
