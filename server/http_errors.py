"""JSON errors for every refused or failed HTTP request.

Owns the translation from `ApiError` and aiohttp's HTTP exceptions to the body
`{"error": {"code": ..., "message": ...}}` with the right status, plus one log line each.
Handlers raise; only this middleware writes error responses.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from .errors import ApiError, TooManyRequests

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CODES_BY_STATUS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def json_error(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return web.Response(
        status=status, body=body, content_type="application/json", headers=headers
    )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error raised by a handler into a JSON error response."""
    try:
        return await handler(request)
    except ApiError as error:
        logger.info(
            "%s %s -> %d %s: %s",
            request.method, request.path, error.status, error.code, error.message,
        )
        headers = None
        if isinstance(error, TooManyRequests):
            headers = {"Retry-After": str(error.retry_after)}
        return json_error(error.status, error.code, error.message, headers=headers)
    except web.HTTPException as http_error:
        if http_error.status < 400:
            raise
        code = _CODES_BY_STATUS.get(http_error.status, "http_error")
        message = http_error.reason
        if http_error.status == 413:
            message = "request body too large"
        elif http_error.status == 404:
            message = "no such route"
        logger.info("%s %s -> %d %s", request.method, request.path, http_error.status, code)
        headers = {}
        if "Allow" in http_error.headers:
            headers["Allow"] = http_error.headers["Allow"]
        return json_error(http_error.status, code, message, headers=headers or None)
    except Exception:
        logger.exception("%s %s -> 500: unhandled error", request.method, request.path)
        return json_error(500, "internal_error", "internal server error")
