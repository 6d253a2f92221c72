"""Request size limits, enforced before a route reads anything (pure ASGI middleware).

- more than ``max_header_count`` headers: 431 at once (vLLM's ``--h11-max-header-count``; the
  header bytes themselves are bounded by uvicorn's h11 parser, ``--h11-max-incomplete-event-size``);
- a body over ``max_body_bytes``: 413 when ``Content-Length`` says so (the body is read and dropped
  first when it is at most 8 times the limit, so that the client, still sending, gets the answer
  rather than a reset; a larger one is answered at once and the connection closed), else as soon
  as the streamed (chunked) body passes the limit, without reading the rest.

Both answers are OpenAI error bodies (``lmserve.errors``); a body found too large while a route
reads it raises the 413 as an ``HTTPException``, which FastAPI passes on to the app's handler.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from starlette.responses import JSONResponse

from lmserve.entrypoints.openai.serving_engine import error_body
from lmserve.errors import HeadersTooLargeError, LMServeError, RequestTooLargeError

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_HEADER_COUNT = 256
DEFAULT_H11_MAX_INCOMPLETE_EVENT_SIZE = 64 * 1024


_DRAIN_FACTOR = 8  # bodies up to this many times the limit are read (and dropped) before the 413


async def _drain(receive: Any) -> None:
    """Reads the request body to its end, keeping nothing."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


def _error(err: LMServeError) -> JSONResponse:
    return JSONResponse(error_body(err).model_dump(), status_code=err.status_code, headers={"Connection": "close"})


class RequestLimitsMiddleware:
    def __init__(self, app: Any, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_header_count: int = DEFAULT_MAX_HEADER_COUNT) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_headers = max_header_count

    def _too_large(self) -> str:
        return (f"The request body is larger than the limit of {self.max_body} bytes "
                "(--max-request-body-bytes).")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers", ())
        if len(headers) > self.max_headers:
            err = HeadersTooLargeError(f"The request has {len(headers)} headers; the limit is {self.max_headers}.")
            return await _error(err)(scope, receive, send)
        for name, value in headers:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                if int(value) <= _DRAIN_FACTOR * self.max_body:
                    await _drain(receive)  # else the client, still sending, sees a reset, not the 413
                return await _error(RequestTooLargeError(self._too_large()))(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, limited_receive, send)
