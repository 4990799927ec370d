"""`GET /v1/events`: one SSE stream for many conversations, or the firehose.

- `?conversations=ID,ID,…`: one pull cursor per conversation, all in this one handler.
  It waits until any cursor has something (`asyncio.wait` over their `wait()` futures),
  takes what each has and writes it re-tagged with its conversation (`multiplex.py`) as
  one write. Each conversation's frames keep their order; a conversation's `end` becomes
  `conversation_end` and the stream goes on until every conversation has ended.
- `?all=1`: one pull cursor on the firehose's log (`firehose.py`), written as is.

Not the hot path (a stream per dashboard, not per viewer), so these streams pull and
write through aiohttp with `await` instead of being pushed into the transport; the hub's
heartbeat reaches only pushed cursors, so the wait here times out after
`hub.heartbeat_seconds` and writes its own `: ping`.

Flows, and who wins the race (see `events_route.py` for the single-conversation ones):
- attach: the bounds are checked and every cursor attached with no await in between;
  each cursor notes its position as it attaches, so nothing falls between the replay and
  the live events of any conversation.
- a conversation ends (deleted, expired, evicted, token expired, or `end_subscribers` on
  shutdown): its cursor hands over its `end`; it is written as `conversation_end`, the
  cursor is detached, the others go on. When none is left: the stream's own `end`.
- slow client: the write awaits the drain, bounded by `hub.send_timeout` (then the
  connection is aborted); meanwhile the cursors only fall behind, and a cursor that falls
  out of its buffer is handed its conversation's `snapshot` on the next take.
- client disconnect: aiohttp cancels this handler; `finally` detaches every cursor and
  cancels the token timers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from aiohttp import web

from .app_keys import ACCESS, FIREHOSE, LIMITS, REGISTRY, SETTINGS
from .auth import end_when_token_expires
from .errors import ApiError, Forbidden, InvalidRequest, NotFound
from .events_route import SSE_HEADERS
from .http_errors import error_response
from .subscriber_totals import total_subscribers
from .hub import HEARTBEAT_FRAME, Cursor, EventLog
from .multiplex import (
    InvalidIds,
    InvalidPosition,
    Multiplexer,
    Position,
    parse_conversation_ids,
    parse_position,
)
from .transport_sink import limit_unacknowledged_time

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no", ""}
_MAX_ID_DIGITS = 19


def _flag(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "").strip().lower()
    if value not in _TRUE and value not in _FALSE:
        raise InvalidRequest(f"{name} must be 1 or 0", code=f"invalid_{name}")
    return value in _TRUE


def _resume_source(request: web.Request) -> tuple[str, str, str] | None:
    """(raw position, what it is called, its error code), or None when none was given.
    `Last-Event-ID` wins over `?after=`."""
    header = request.headers.get("Last-Event-ID", "").strip()
    if header:
        return header, "Last-Event-ID", "invalid_last_event_id"
    if "after" in request.query:
        return request.query["after"], "after", "invalid_after"
    return None


async def combined_events(request: web.Request) -> web.StreamResponse:
    """Dispatch on the query: exactly one of `conversations=` and `all=1`."""
    try:
        wants_all = _flag(request.query, "all")
        if wants_all == ("conversations" in request.query):
            raise InvalidRequest(
                "give either ?conversations=ID,ID,... or ?all=1", code="invalid_query"
            )
    except ApiError as error:
        return error_response(request, error)
    if wants_all:
        return await _firehose_events(request)
    return await _multiplexed_events(request)


# --- ?conversations= ------------------------------------------------------------------------


def _watch_token_seconds(request: web.Request, ids: list[str]) -> list[float | None]:
    """Seconds each conversation's watch token has left (None: no token needed).

    With API keys configured the route requires a key (see `routes.py`), which stands in
    for watch tokens. Without keys and with `auth.require_watch_token`, `?tokens=` must
    hold one valid token per id, in the same order.
    """
    access = request.app[ACCESS]
    if access.keys.enabled or not access.require_watch_token:
        return [None] * len(ids)
    raw = request.query.get("tokens", "")
    tokens = [token.strip() for token in raw.split(",")] if raw else []
    if len(tokens) != len(ids):
        raise Forbidden(
            "a watch token per conversation is required: ?tokens=T1,T2,... in the order of "
            "conversations"
        )
    return [
        access.tokens.seconds_left(access.tokens.verify(token, conversation_id))
        for token, conversation_id in zip(tokens, ids)
    ]


def _start_positions(request: web.Request, logs: list[EventLog | None]) -> list[Position]:
    source = _resume_source(request)
    if source is None:
        live = _flag(request.query, "live")
        return [log.last_seq if live and log is not None else 0 for log in logs]
    raw, name, code = source
    try:
        positions = parse_position(raw, len(logs))
    except InvalidPosition as error:
        raise InvalidRequest(f"{name} {error}", code=code) from None
    for position, log in zip(positions, logs):
        if position is not None and log is not None and position > log.last_seq:
            raise InvalidRequest(
                f"{name} entry {position} is beyond that conversation's last event "
                f"({log.last_seq})",
                code=code,
            )
    return positions


def _log_of(request: web.Request, conversation_id: str) -> EventLog | None:
    try:
        return request.app[REGISTRY].get(conversation_id).log
    except NotFound:
        return None


async def _multiplexed_events(request: web.Request) -> web.StreamResponse:
    app = request.app
    try:
        try:
            ids = parse_conversation_ids(request.query["conversations"])
        except InvalidIds as error:
            raise InvalidRequest(str(error), code="invalid_conversations") from None
        # Before the lookups: without valid tokens, not even existence is revealed.
        token_seconds = _watch_token_seconds(request, ids)
        logs = [_log_of(request, conversation_id) for conversation_id in ids]
        positions = _start_positions(request, logs)
        followed = {
            index: log
            for index, (log, position) in enumerate(zip(logs, positions))
            if log is not None and position is not None
        }
        if not followed:
            raise NotFound(
                "none of these conversations is held (or left to follow)",
                code="conversation_not_found",
            )
        # No await from here to the last subscribe(): the bounds cannot be overshot.
        limits, total = app[LIMITS], total_subscribers(app)
        for attached, log in enumerate(followed.values()):
            limits.admit_subscriber(
                conversation_subscribers=log.subscriber_count, total_subscribers=total + attached
            )
    except ApiError as error:
        return error_response(request, error)
    mux = Multiplexer(ids, positions)
    cursors: dict[int, Cursor] = {}
    timers: list[asyncio.TimerHandle] = []
    for index, log in followed.items():
        position = positions[index]
        assert position is not None
        cursor = cursors[index] = log.subscribe(after=position)
        timer = end_when_token_expires(cursor, token_seconds[index])
        if timer is not None:
            timers.append(timer)
    settings = app[SETTINGS].hub
    first = b"retry: %d\n\n" % settings.retry_hint_ms
    first += b"".join(
        mux.not_found(index)
        for index, position in enumerate(positions)
        if index not in followed and position is not None
    )
    response = web.StreamResponse(headers=SSE_HEADERS)
    if request.version >= (1, 1):
        response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        if request.transport is not None:
            limit_unacknowledged_time(request.transport, settings.send_timeout)
        data = first + _take_all(mux, cursors)
        while True:
            if data:
                async with asyncio.timeout(settings.send_timeout):
                    await response.write(data)
            if mux.all_ended:
                break
            done, _ = await asyncio.wait(
                # Futures, as MemoryCursor's are; a coroutine would become a task here.
                [asyncio.ensure_future(cursor.wait()) for cursor in cursors.values()],
                timeout=settings.heartbeat_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
            data = _take_all(mux, cursors) if done else HEARTBEAT_FRAME
        async with asyncio.timeout(settings.send_timeout):
            await response.write(mux.end_frame())
    except TimeoutError:
        logger.info(
            "combined stream of %d conversations: dropped a subscriber whose writes did not "
            "drain in %g s", len(ids), settings.send_timeout,
        )
        if request.transport is not None:
            request.transport.abort()
    except ConnectionResetError:
        logger.debug("combined stream: subscriber went away")
    finally:
        for timer in timers:
            timer.cancel()
        for cursor in cursors.values():
            cursor.detach()
    return response


def _take_all(mux: Multiplexer, cursors: dict[int, Cursor]) -> bytes:
    """Everything the cursors have, re-tagged, as one run; finished cursors are detached
    and dropped from `cursors`."""
    out = []
    for index, cursor in list(cursors.items()):
        data = cursor.take()
        if data:
            out.append(mux.retag(index, data))
        if cursor.finished:
            cursor.detach()
            del cursors[index]
    return b"".join(out)


# --- ?all=1 ---------------------------------------------------------------------------------


def _firehose_position(request: web.Request, log: EventLog) -> int | None:
    """Where a firehose subscriber starts: after the given id, at the live edge
    (`?live=1`), or None for a fresh one (a `snapshot` first, then live)."""
    source = _resume_source(request)
    if source is None:
        return log.last_seq if _flag(request.query, "live") else None
    raw, name, code = source
    text = raw.strip()
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_ID_DIGITS:
        raise InvalidRequest(f"{name} must be a non-negative integer event id", code=code)
    position = int(text)
    if position > log.last_seq:
        raise InvalidRequest(
            f"{name} {position} is beyond the firehose's last event ({log.last_seq})", code=code
        )
    return position


async def _firehose_events(request: web.Request) -> web.StreamResponse:
    app = request.app
    firehose = app[FIREHOSE]
    log = firehose.log
    try:
        position = _firehose_position(request, log)
        app[LIMITS].admit_subscriber(
            conversation_subscribers=0,
            total_subscribers=total_subscribers(app),
        )
    except ApiError as error:
        return error_response(request, error)
    settings = app[SETTINGS].hub
    first = b"retry: %d\n\n" % settings.retry_hint_ms
    if position is None:
        # The table as of last_seq, then everything after it: no await in between.
        first += log.snapshot_frame()
        position = log.last_seq
    cursor = log.subscribe(after=position)
    response = web.StreamResponse(headers=SSE_HEADERS)
    if request.version >= (1, 1):
        response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        if request.transport is not None:
            limit_unacknowledged_time(request.transport, settings.send_timeout)
        data = first + cursor.take()
        while True:
            if data:
                async with asyncio.timeout(settings.send_timeout):
                    await response.write(data)
            if cursor.finished:
                break
            done, _ = await asyncio.wait(
                [asyncio.ensure_future(cursor.wait())], timeout=settings.heartbeat_seconds
            )
            data = cursor.take() if done else HEARTBEAT_FRAME
    except TimeoutError:
        logger.info(
            "firehose: dropped a subscriber whose writes did not drain in %g s",
            settings.send_timeout,
        )
        if request.transport is not None:
            request.transport.abort()
    except ConnectionResetError:
        logger.debug("firehose: subscriber went away")
    finally:
        cursor.detach()
    return response
