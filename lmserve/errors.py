"""One exception hierarchy; the server maps it to HTTP status and OpenAI error bodies in
one place (``{"error": {"message", "type", "param", "code"}}``).

Engine-side validation raises plain ``ValueError``; the server treats it as
``InvalidRequestError`` (400).
"""

from __future__ import annotations


class LMServeError(Exception):
    status_code: int = 500
    err_type: str = "InternalServerError"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(LMServeError, ValueError):
    status_code = 400
    err_type = "BadRequestError"


class AuthenticationError(LMServeError):
    status_code = 401
    err_type = "AuthenticationError"


class NotFoundError(LMServeError):
    status_code = 404
    err_type = "NotFoundError"


class OverloadedError(LMServeError):
    """Too many requests are waiting: answer 503 rather than queue without bound."""

    status_code = 503
    err_type = "ServiceUnavailableError"


class EngineDeadError(LMServeError):
    status_code = 503
    err_type = "EngineDeadError"


class NotReadyError(LMServeError):
    """The server is up but its engine is still loading."""

    status_code = 503
    err_type = "ServiceUnavailableError"


class EngineShutdownError(LMServeError):
    """The server is shutting down and ended the request (``--shutdown-timeout``)."""

    status_code = 503
    err_type = "ServiceUnavailableError"


class RequestTooLargeError(LMServeError):
    """The request body is over --max-request-body-bytes."""

    status_code = 413
    err_type = "RequestTooLargeError"


class HeadersTooLargeError(LMServeError):
    """The request has more headers than --h11-max-header-count."""

    status_code = 431
    err_type = "RequestHeaderFieldsTooLargeError"
