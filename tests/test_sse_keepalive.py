"""``--sse-keep-alive-interval``: comment lines while a stream is idle, never elsewhere."""

from __future__ import annotations

import asyncio

import pytest

from lmserve.entrypoints.openai.sse_keepalive import KEEP_ALIVE, SSEKeepAliveMiddleware


def _app(content_type: bytes, idle: float):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]})
        await asyncio.sleep(idle)
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await asyncio.sleep(idle)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
    return app


def _run(app, path: str) -> list[bytes]:
    sent: list[bytes] = []

    async def send(message):
        if message["type"] == "http.response.body":
            sent.append(message["body"])

    async def receive():
        return {"type": "http.disconnect"}

    asyncio.run(SSEKeepAliveMiddleware(app, 0.02)({"type": "http", "path": path}, receive, send))
    return sent


def test_idle_stream_gets_comments_between_whole_chunks():
    sent = _run(_app(b"text/event-stream; charset=utf-8", 0.3), "/v1/chat/completions")
    assert KEEP_ALIVE in sent[:sent.index(b"data: 1\n\n")]  # while waiting for the first chunk
    assert sent[-1] == b"data: [DONE]\n\n"  # nothing after the last chunk
    assert set(sent) == {KEEP_ALIVE, b"data: 1\n\n", b"data: [DONE]\n\n"}


@pytest.mark.parametrize("content_type, path", [(b"application/json", "/v1/chat/completions"),
                                                (b"text/event-stream", "/v1/embeddings")])
def test_no_comments_outside_streamed_generation(content_type, path):
    assert KEEP_ALIVE not in _run(_app(content_type, 0.15), path)


def test_interval_must_be_positive():
    with pytest.raises(ValueError):
        SSEKeepAliveMiddleware(None, 0)
