"""OpenAI-style error objects and the exception types that map to them.

Every component raises these for client-visible failures; each HTTP layer turns them into a
response in one place with `error_body()` and `exc.status`.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A client-visible failure with an HTTP status and an OpenAI error type."""

    status = 500
    error_type = "internal_server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """Return the OpenAI error object for this failure."""
        return error_body(self.message, self.error_type, self.param, self.code or self.status)


class BadRequestError(APIError):
    """Malformed JSON, a missing field or an invalid parameter (400)."""

    status = 400
    error_type = "invalid_request_error"


class AuthenticationError(APIError):
    """API key missing or wrong (401)."""

    status = 401
    error_type = "authentication_error"


class ForbiddenError(APIError):
    """The request names a target it may not use, such as a prefill host outside the pool (403)."""

    status = 403
    error_type = "permission_error"


class NotFoundError(APIError):
    """Unknown model or path (404)."""

    status = 404
    error_type = "not_found_error"


class MethodNotAllowedError(APIError):
    """A known path requested with a method it does not serve (405).

    `allow` lists the methods it serves, for the `Allow` response header.
    """

    status = 405
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, allow: tuple[str, ...]):
        super().__init__(message)
        self.allow = allow


class PayloadTooLargeError(APIError):
    """Request body over the configured limit (413)."""

    status = 413
    error_type = "invalid_request_error"


class TooManyRequestsError(APIError):
    """Over capacity, every candidate filtered out, or shed under saturation (429).

    `drop_reason` is sent in the `x-llmisvc-drop-reason` header.
    """

    status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, drop_reason: str, param: str | None = None):
        super().__init__(message, param=param)
        self.drop_reason = drop_reason


class ServiceUnavailableError(APIError):
    """No ready endpoint in a pool the request needs, or a queue wait past its timeout (503)."""

    status = 503
    error_type = "service_unavailable"


class GatewayTimeoutError(APIError):
    """An upstream call ran past its timeout (504)."""

    status = 504
    error_type = "timeout_error"


def error_body(
    message: str,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: int | str | None = None,
) -> dict[str, Any]:
    """Return an OpenAI error object: {"error": {message, type, param, code}}."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
