"""`GET /v1/conversations/{id}/events`: a conversation's Server-Sent Events stream.

Thin on purpose: parse where the subscriber resumes, attach a cursor, write whatever the
cursor hands over, detach. The frames are the hub's pre-encoded bytes; nothing is
encoded here per subscriber.

Flows, and who wins the race:
- normal end: the log is closed (deleted / expired / shutdown); the cursor hands over
  any frames still pending, then the `end` frame; the handler writes them and returns.
- client disconnect: the server runs with `handler_cancellation=True`, so aiohttp cancels
  this handler when the connection drops; `finally` detaches the cursor. A write that
  fails first (reset) ends the loop the same way.
- heartbeat: aiohttp-sse's ping task writes `: ping` comments every heartbeat_seconds.
  Frames never interleave with it: each write reaches the transport in one piece.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .errors import InvalidRequest
from .hub import EventLog

logger = logging.getLogger(__name__)

_MAX_ID_DIGITS = 19
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no", ""}


def _parse_position(raw: str, *, what: str, code: str) -> int:
    text = raw.strip()
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_ID_DIGITS:
        raise InvalidRequest(f"{what} must be a non-negative integer event id", code=code)
    return int(text)


def resume_position(request: web.Request, log: EventLog) -> int:
    """The sequence number after which this subscriber starts.

    `Last-Event-ID` wins over `?after=N`, which wins over `?live=1`; with none of them the
    subscriber starts from the beginning (a full replay, or a snapshot).
    """
    header = request.headers.get("Last-Event-ID", "").strip()
    if header:
        position = _parse_position(header, what="Last-Event-ID", code="invalid_last_event_id")
        source = "Last-Event-ID"
    elif "after" in request.query:
        position = _parse_position(request.query["after"], what="after", code="invalid_after")
        source = "after"
    else:
        live = request.query.get("live", "").strip().lower()
        if live not in _TRUE and live not in _FALSE:
            raise InvalidRequest("live must be 1 or 0", code="invalid_live")
        return log.last_seq if live in _TRUE else 0
    if position > log.last_seq:
        raise InvalidRequest(
            f"{source} {position} is beyond this conversation's last event ({log.last_seq})",
            code="invalid_last_event_id" if source == "Last-Event-ID" else "invalid_after",
        )
    return position


async def stream_events(
    request: web.Request,
    log: EventLog,
    *,
    heartbeat_seconds: float,
    retry_hint_ms: int,
    label: str,
) -> web.StreamResponse:
    """Serve one subscriber until the log ends or the client goes away."""
    position = resume_position(request, log)
    cursor = log.subscribe(after=position)
    response = EventSourceResponse(ping_interval=heartbeat_seconds)
    try:
        await response.prepare(request)
        async with response:
            # One write: the reconnection hint, then the whole replay (or snapshot).
            await response.write(b"retry: %d\n\n" % retry_hint_ms + cursor.take())
            while not cursor.finished:
                await cursor.wait()
                data = cursor.take()
                if data:
                    await response.write(data)
    except ConnectionResetError:
        logger.debug("%s: subscriber went away", label)
    finally:
        cursor.detach()
    return response
