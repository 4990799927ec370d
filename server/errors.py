"""Domain errors and the error codes that travel to clients.

Two families: `UpstreamFailure` ends a turn and becomes an `error` event (it is data once
streaming has started); `ApiError` is a refused HTTP request, translated to a JSON error
body by the HTTP layer. Handlers raise these; only the HTTP layer knows status lines.
"""

from __future__ import annotations

from enum import StrEnum


class TurnErrorCode(StrEnum):
    """Codes of the `error` event that ends a turn."""

    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_PROTOCOL = "upstream_protocol"
    CANCELLED = "cancelled"
    INTERNAL = "internal_error"


class UpstreamFailure(Exception):
    """The upstream request failed; the turn ends with an `error` event carrying `code`."""

    def __init__(self, code: TurnErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ApiError(Exception):
    """A request Chorus refuses. The HTTP layer answers `status` with the JSON error body."""

    status = 400
    code = "bad_request"
    # Seconds before a retry may succeed, sent as `Retry-After`; None where that does not apply.
    retry_after: int | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidRequest(ApiError):
    status = 400
    code = "invalid_request"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    code = "body_too_large"


class TooManyRequests(ApiError):
    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class UnprocessableEntity(ApiError):
    status = 422
    code = "unprocessable_entity"


class ServiceUnavailable(ApiError):
    """The server is at a capacity bound; unlike 429 it is not this caller's doing."""

    status = 503
    code = "service_unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Unauthorized(ApiError):
    """No API key, or not a configured one (the two are not told apart)."""

    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    """A watch token that is missing, invalid or for another conversation (`forbidden`) or
    expired (`token_expired`); a CORS preflight from an origin not allowed."""

    status = 403
    code = "forbidden"
