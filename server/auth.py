"""Access control over HTTP: API keys, watch tokens, CORS and the page's security headers.

Owns how a request proves who it is and what it may watch; the credentials themselves
(keys, token signing) live in `credentials.py`. No middleware, on purpose (see
`http_errors.json_errors`): the checks are decorators applied where routes are
registered, plus one call in the SSE route, and the response headers are added by the
`on_response_prepare` signal, which runs once per response and stays on no stack.

- API keys (`Authorization: Bearer <key>` or `X-API-Key`), when any are configured, are
  required to create, follow up, cancel, delete and list: `require_api_key`. Missing and
  wrong keys get the same 401, checked before the body is read.
- Watching (`GET .../events` and `GET /v1/conversations/{id}`) needs the unguessable id
  and, with `auth.require_watch_token`, a watch token for that conversation, as `?token=`
  (EventSource cannot send headers) or the HttpOnly cookie `chorus_watch_<id>` set at
  creation: `authorize_watch`, `require_watch_token`. A token that expires while a stream
  is open ends that stream with `end` `token_expired`: one timer handle per stream, which
  calls the cursor's `end` (no task).
- CORS from the `auth.cors_origins` allowlist; preflights answered by `cors_preflight`.
- The pages (`/`, `/dashboard`, `/web/*`) are served with a strict Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_log import AccessLogger

from .app_keys import ACCESS, SETTINGS
from .credentials import API_KEYS_ENV, TOKEN_SECRET_ENV, load_access_control
from .errors import ApiError, Forbidden, Unauthorized
from .http_errors import Handler, error_response, no_such_route
from .hub import Cursor
from .path_params import conversation_id_of, events_url

logger = logging.getLogger(__name__)

TOKEN_EXPIRED = "token_expired"
WATCH_COOKIE_PREFIX = "chorus_watch_"
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# The HTML pages (their files are under /web/): they get the CSP above.
PAGE_PATHS = frozenset({"/", "/dashboard"})
PREFLIGHT_METHODS = "GET, POST, DELETE"
PREFLIGHT_HEADERS = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID, X-API-Key"
PREFLIGHT_MAX_AGE_SECONDS = 600
# Response headers a cross-origin script may read besides the CORS-safelisted ones.
EXPOSED_HEADERS = "Retry-After, WWW-Authenticate, Idempotent-Replayed"
_UNAUTHORIZED_MESSAGE = "a valid API key is required (Authorization: Bearer <key>)"


# --- start-up -------------------------------------------------------------------------------


async def _access_control(app: web.Application) -> AsyncIterator[None]:
    """Load keys and the token secret (from the environment and `auth.api_keys_file`)."""
    settings = app[SETTINGS]
    access = load_access_control(settings.auth, os.environ)
    app[ACCESS] = access
    if access.keys.enabled:
        logger.info("auth: %d API key(s) configured", len(access.keys))
    elif not settings.use_mock:
        logger.warning(
            "auth: no API keys configured (%s or auth.api_keys_file): the API is "
            "unauthenticated, anyone who can reach it can start, list and delete conversations",
            API_KEYS_ENV,
        )
    if not access.persistent_secret:
        logger.log(
            logging.WARNING if access.require_watch_token else logging.INFO,
            "auth: %s is not set, using a random secret: watch tokens will not survive a "
            "restart",
            TOKEN_SECRET_ENV,
        )
    yield


def setup_access_control(app: web.Application) -> None:
    """Wire access control into `app`: load credentials at start-up, add response headers.
    Call before the other cleanup contexts, so a bad keys file stops start-up first."""
    app.cleanup_ctx.append(_access_control)
    app.on_response_prepare.append(_security_headers)


# --- API keys -------------------------------------------------------------------------------


def presented_key(request: web.Request) -> str | None:
    """The API key the request carries: `Authorization: Bearer <key>`, else `X-API-Key`."""
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    key = request.headers.get("X-API-Key", "").strip()
    return key or None


def caller_identity(request: web.Request) -> str:
    """Who is asking, for rate limits and idempotency: `key:<16 hex of the key's SHA-256>`
    for a valid API key, else `addr:<remote address>` (keys off, or no valid key on a route
    that does not require one). Never the key itself."""
    key = presented_key(request)
    if key is not None:
        identity = request.app[ACCESS].keys.identify(key)
        if identity is not None:
            return identity
    return f"addr:{request.remote or 'unknown'}"


def _unauthorized(request: web.Request) -> web.Response:
    response = error_response(request, Unauthorized(_UNAUTHORIZED_MESSAGE))
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def require_api_key(handler: Handler) -> Handler:
    """Refuse the request with 401 before `handler` (and before its body is read) unless it
    carries a configured API key; with no key configured, let everything through."""

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        keys = request.app[ACCESS].keys
        if keys.enabled:
            key = presented_key(request)
            if key is None or keys.identify(key) is None:
                return _unauthorized(request)
        return await handler(request)

    return checked


# --- watch tokens ---------------------------------------------------------------------------


def watch_cookie_name(conversation_id: str) -> str:
    return WATCH_COOKIE_PREFIX + conversation_id


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchGrant:
    """What the creator of a conversation is given to watch it: the token, the events URL
    (with `?token=` when tokens are required) and the cookie that carries the token."""

    conversation_id: str
    token: str
    expires_at: float
    events_url: str
    max_age: int
    secure: bool

    def set_cookie(self, response: web.StreamResponse) -> None:
        """HttpOnly (no script reads it), SameSite=Strict, and sent only to this
        conversation's own paths."""
        response.set_cookie(
            watch_cookie_name(self.conversation_id),
            self.token,
            max_age=self.max_age,
            path=f"/v1/conversations/{self.conversation_id}",
            httponly=True,
            samesite="Strict",
            secure=self.secure,
        )


def grant_watch(request: web.Request, conversation_id: str) -> WatchGrant:
    """Issue a watch token for `conversation_id` (always; required only when configured)."""
    access = request.app[ACCESS]
    token = access.tokens.issue(conversation_id)
    url = events_url(conversation_id)
    if access.require_watch_token:
        url += f"?token={token.value}"
    return WatchGrant(
        conversation_id=conversation_id,
        token=token.value,
        expires_at=token.expires_at,
        events_url=url,
        max_age=max(1, math.ceil(access.tokens.ttl_seconds)),
        secure=request.secure,
    )


def authorize_watch(request: web.Request, conversation_id: str) -> float | None:
    """Seconds the request's watch token has left, or None when no token is required.

    The token is `?token=` when given, else the cookie. Raises Forbidden: `forbidden` when
    it is missing, malformed, forged or for another conversation; `token_expired`.
    """
    access = request.app[ACCESS]
    if not access.require_watch_token:
        return None
    token = request.query.get("token") or request.cookies.get(watch_cookie_name(conversation_id))
    if not token:
        raise Forbidden(
            "a watch token for this conversation is required (?token= or its cookie)"
        )
    return access.tokens.seconds_left(access.tokens.verify(token, conversation_id))


def end_when_token_expires(
    cursor: Cursor, seconds_left: float | None
) -> asyncio.TimerHandle | None:
    """Schedule `end` `token_expired` for this one subscriber; the caller cancels the
    handle when the stream ends first. One timer handle, no task, per stream."""
    if seconds_left is None:
        return None
    return asyncio.get_running_loop().call_later(seconds_left, cursor.end, TOKEN_EXPIRED)


def require_watch_token(handler: Handler) -> Handler:
    """Refuse the request with 403 unless it may watch the conversation in its path."""

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        try:
            authorize_watch(request, conversation_id_of(request))
        except ApiError as error:
            return error_response(request, error)
        return await handler(request)

    return checked


# --- CORS and security headers --------------------------------------------------------------


def _is_api(path: str) -> bool:
    return path.startswith("/v1/")


async def cors_preflight(request: web.Request) -> web.StreamResponse:
    """`OPTIONS` on an API path with `Origin` and `Access-Control-Request-Method`: 204 with
    the allowed methods and headers for an allowed origin (the origin headers themselves
    are added by `_security_headers`), 403 otherwise. Any other OPTIONS request is answered
    as it was before there were preflights: by the catch-all route."""
    headers = request.headers
    if (
        not _is_api(request.path)
        or "Origin" not in headers
        or "Access-Control-Request-Method" not in headers
    ):
        return await no_such_route(request)
    if headers["Origin"] not in request.app[ACCESS].cors_origins:
        return error_response(request, Forbidden("this origin is not allowed (CORS)"))
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": PREFLIGHT_METHODS,
            "Access-Control-Allow-Headers": PREFLIGHT_HEADERS,
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_SECONDS),
        },
    )


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the page's CSP, and CORS headers on API responses to an
    allowed origin."""
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    path = request.path
    if path in PAGE_PATHS or path.startswith("/web/"):
        headers["Content-Security-Policy"] = PAGE_CSP
        headers["Referrer-Policy"] = "no-referrer"
        return
    if not _is_api(path):
        return
    origins = request.app[ACCESS].cors_origins
    if not origins:
        return
    # The answer depends on Origin whether or not this one is allowed: tell caches.
    headers.add("Vary", "Origin")
    origin = request.headers.get("Origin")
    if origin is not None and origin in origins:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Allow-Credentials"] = "true"
        headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS


# --- access log -----------------------------------------------------------------------------

_TOKEN_QUERY = re.compile(r"([?&]tokens?=)[^&\s]*")  # ?token= and ?tokens=


class RedactingAccessLogger(AccessLogger):
    """aiohttp's access log with `?token=` values replaced by `REDACTED`: a watch token in
    a request line is a credential, and access logs are kept and shipped. Use it as
    `access_log_class`."""

    def _format_line(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float
    ) -> Iterable[tuple[str | tuple[str, str], str]]:
        return [
            (key, _TOKEN_QUERY.sub(r"\1REDACTED", value) if key == "first_request_line" else value)
            for key, value in super()._format_line(request, response, time)
        ]
