"""`Idempotency-Key` on the routes that start turns: a client's retry never pays twice.

The `idempotent` decorator wraps a POST handler (inside `json_errors`). A request without
the header passes straight through. With it, the first successful (2xx) answer is
remembered per caller, route and key for `server.idempotency_window_seconds`; a repeat
with the same body gets that answer again, with `Idempotent-Replayed: true`, and starts
nothing. Errors are not remembered, so a retry after a 429 can still succeed.
"""

from __future__ import annotations

import functools
import logging

from aiohttp import web

from .app_keys import IDEMPOTENCY, LIMITS
from .errors import InvalidRequest
from .http_errors import Handler
from .idempotency import StoredResponse, check_idempotency_key, fingerprint

logger = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
# Set again on the replay from its own body; everything else the handler set is kept.
_NOT_STORED = frozenset({"content-type", "content-length"})


def idempotency_key(request: web.Request) -> str | None:
    """The request's Idempotency-Key, validated; None without one."""
    values = request.headers.getall(IDEMPOTENCY_HEADER, [])
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest(
            "send one Idempotency-Key header, not several", code="invalid_idempotency_key"
        )
    return check_idempotency_key(values[0])


def _stored(response: web.Response, body: bytes) -> StoredResponse:
    headers = [
        (name, value) for name, value in response.headers.items()
        if name.lower() not in _NOT_STORED
    ]
    # Cookies become Set-Cookie headers only when the response is sent: take them now.
    headers += [("Set-Cookie", morsel.OutputString()) for morsel in response.cookies.values()]
    return StoredResponse(response.status, body, tuple(headers))


def idempotent(handler: Handler) -> Handler:
    """Answer a repeated Idempotency-Key from the store instead of calling `handler`."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        key = idempotency_key(request)
        if key is None:
            return await handler(request)
        body = await request.read()
        store = request.app[IDEMPOTENCY]
        entry = (request.app[LIMITS].caller(request), f"{request.method} {request.path}", key)
        stored = store.begin(entry, fingerprint(body))
        if stored is not None:
            logger.info("%s %s -> %d replayed (Idempotency-Key)",
                        request.method, request.path, stored.status)
            return web.Response(
                status=stored.status,
                body=stored.body,
                content_type="application/json",
                headers=[*stored.headers, (REPLAYED_HEADER, "true")],
            )
        try:
            response = await handler(request)
            if (
                200 <= response.status < 300
                and isinstance(response, web.Response)
                and isinstance(response.body, bytes)
            ):
                store.finish(entry, _stored(response, response.body))
            return response
        finally:
            store.abandon(entry)

    return wrapper
