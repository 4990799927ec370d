"""The HTTP API's handlers: parse the request, call the registry, shape the JSON answer.

Errors are raised as `ApiError`s and turned into JSON by the `json_errors` middleware.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from . import __version__
from .app_keys import LIMITS, METRICS, READINESS, REGISTRY, SETTINGS, UPSTREAM_INFO
from .auth import cors_preflight, grant_watch, require_api_key, require_watch_token
from .chat_request import parse_chat_start, parse_follow_up
from .combined_route import combined_events
from .errors import InvalidRequest, NotFound, PayloadTooLarge, ServiceUnavailable
from .events_route import conversation_events
from .http_errors import json_errors, no_such_route
from .idempotency_route import idempotent
from .path_params import conversation_id_of, events_url

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"


def json_response(body: Any, *, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def read_json(request: web.Request) -> object:
    """The request body decoded as JSON; 413 past max_body_bytes, 400 when malformed."""
    limit = request.app[SETTINGS].server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes") from None
    if not raw.strip():
        raise InvalidRequest("the body must be a JSON object", code="invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None


@json_errors
@idempotent
async def create_conversation(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    body = await read_json(request)
    start = parse_chat_start(
        body, default_model=settings.upstream.model, max_choices=settings.upstream.max_choices,
        max_messages=settings.limits.max_messages,
    )
    # Checked and counted with no await in between, and counted only once started.
    limits = request.app[LIMITS]
    caller = limits.caller(request)
    limits.check_start(caller)
    conversation = request.app[REGISTRY].create(start)
    limits.record_start(caller)
    grant = grant_watch(request, conversation.id)
    response = json_response(
        {
            "id": conversation.id,
            "events_url": grant.events_url,
            "status": conversation.status,
            "watch_token": grant.token,
            "watch_token_expires_at": grant.expires_at,
        },
        status=201,
    )
    grant.set_cookie(response)
    return response


@json_errors
@idempotent
async def follow_up(request: web.Request) -> web.Response:
    conversation_id = conversation_id_of(request)
    content = parse_follow_up(await read_json(request))
    limits = request.app[LIMITS]
    caller = limits.caller(request)
    limits.check_start(caller)
    # The history sent upstream grows by two messages a turn: bound it like a create's.
    max_messages = request.app[SETTINGS].limits.max_messages
    history = request.app[REGISTRY].get(conversation_id).message_count_after_follow_up()
    if max_messages and history > max_messages:
        raise PayloadTooLarge(
            f"this follow-up would make the conversation {history} messages long; at most "
            f"{max_messages} are accepted (limits.max_messages)",
            code="too_many_messages",
        )
    conversation, turn = request.app[REGISTRY].follow_up(conversation_id, content)
    limits.record_start(caller)
    return json_response(
        {
            "id": conversation.id,
            "events_url": events_url(conversation.id),
            "status": conversation.status,
            "turn": turn,
        },
        status=202,
    )


@json_errors
async def cancel_turn(request: web.Request) -> web.Response:
    conversation = await request.app[REGISTRY].cancel(conversation_id_of(request))
    return json_response({"id": conversation.id, "status": conversation.status}, status=202)


@json_errors
async def delete_conversation(request: web.Request) -> web.Response:
    await request.app[REGISTRY].delete(conversation_id_of(request))
    return web.Response(status=204)


@json_errors
async def get_conversation(request: web.Request) -> web.Response:
    conversation = request.app[REGISTRY].get(conversation_id_of(request))
    return json_response(conversation.to_json())


@json_errors
async def list_conversations(request: web.Request) -> web.Response:
    return json_response(
        {
            "conversations": [
                {
                    "id": conversation.id,
                    "status": conversation.status,
                    "model": conversation.model,
                    "created_at": conversation.created_at,
                    "turns": conversation.turn_count,
                    "subscribers": conversation.log.subscriber_count,
                    "last_seq": conversation.log.last_seq,
                }
                for conversation in request.app[REGISTRY].all()
            ]
        }
    )


@json_errors
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@json_errors
async def readyz(request: web.Request) -> web.Response:
    """200 once every cleanup context has started; 503 `not_ready` from shutdown on."""
    readiness = request.app[READINESS]
    if not readiness.ready:
        raise ServiceUnavailable(f"not ready: {readiness.state}", code="not_ready")
    return json_response({"status": "ready"})


@json_errors
async def metrics(request: web.Request) -> web.Response:
    """Prometheus' text format, or OpenMetrics when the scraper's Accept asks for it."""
    body, content_type = request.app[METRICS].render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


@json_errors
async def info(request: web.Request) -> web.Response:
    return json_response({"upstream": request.app[UPSTREAM_INFO], "version": __version__})


@json_errors
async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_ROOT / "index.html")


@json_errors
async def dashboard(request: web.Request) -> web.FileResponse:
    """The operators' live table, fed by the firehose (`GET /v1/events?all=1`)."""
    return web.FileResponse(WEB_ROOT / "dashboard.html")


# The page's files, listed once at start-up: only these names are ever served.
_WEB_FILES = frozenset(path.name for path in WEB_ROOT.iterdir() if path.is_file())


@json_errors
async def web_file(request: web.Request) -> web.FileResponse:
    """The page's own files, by name: no directory listing, no path outside `web/`."""
    name = request.match_info["name"]
    if name not in _WEB_FILES:
        raise NotFound(f"no file {name!r}", code="not_found")
    return web.FileResponse(WEB_ROOT / name)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_get("/web/{name}", web_file)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/info", info)
    # API keys (when configured) guard what changes or lists; watching needs the id and,
    # when required, a watch token (the events route checks it itself). See auth.py.
    app.router.add_post("/v1/conversations", require_api_key(create_conversation))
    app.router.add_get("/v1/conversations", require_api_key(list_conversations))
    app.router.add_get(
        "/v1/conversations/{conversation_id}", require_watch_token(get_conversation)
    )
    app.router.add_delete(
        "/v1/conversations/{conversation_id}", require_api_key(delete_conversation)
    )
    app.router.add_post("/v1/conversations/{conversation_id}/messages", require_api_key(follow_up))
    app.router.add_post("/v1/conversations/{conversation_id}/cancel", require_api_key(cancel_turn))
    # No HEAD: it would attach a subscriber to a response that must have no body.
    app.router.add_get(
        "/v1/conversations/{conversation_id}/events", conversation_events, allow_head=False
    )
    # Many conversations in one stream, or the firehose: they reveal many conversations,
    # so an API key when keys are configured (README "Multiplexed and firehose streams").
    app.router.add_get("/v1/events", require_api_key(combined_events), allow_head=False)
    # CORS preflights: OPTIONS on the catch-all's own resource (registered first, so it
    # wins for OPTIONS); anything that is not a preflight goes on to the catch-all.
    app.router.add_route("OPTIONS", "/{tail:.*}", cors_preflight)
    # Last: whatever no route above took gets a JSON 404 (or 405 with Allow).
    app.router.add_route("*", "/{tail:.*}", no_such_route)
