"""`GET /v1/conversations/{id}/events`: a conversation's Server-Sent Events stream.

Thin on purpose: parse where the subscriber resumes, attach a cursor, write the replay,
then let the hub push new frames straight into the connection. The frames are the hub's
pre-encoded bytes; nothing is encoded here per subscriber.

The hot path has no await: the hub's flush calls `TransportSink.send`, which frames the
bytes as one HTTP chunk and hands them to the transport (one `send()` syscall when the
socket has room). This handler's task sleeps until the hub needs it.

Flows, and who wins the race:
- replay: the `retry:` hint and everything the cursor has pending go out as one write
  through aiohttp (which also sends the headers); only then is the cursor pushed to the
  sink, so nothing is written before the headers and nothing is written twice.
- backed up: the sink reports the transport above its high-water mark; the hub stops
  pushing to it and wakes this handler, which awaits `drain()`, then `resume()`s the
  cursor: one write of everything missed (or a snapshot). Repeat.
- normal end: the log is closed (deleted / expired / shutdown); the hub sends the
  pending frames and the `end` frame; the cursor is finished and this handler returns.
- watch token expires (`auth.require_watch_token`): a timer handle set at attach calls
  `cursor.end("token_expired")`, which ends this subscriber alone like a normal end;
  `finally` cancels the handle when the stream ends first.
- stalled: a backed-up connection that does not drain within `hub.send_timeout` is
  aborted (and the kernel is told, with TCP_USER_TIMEOUT, to give up on a peer that
  acknowledges nothing for as long, which covers heartbeats on a quiet stream too).
- client disconnect: the server runs with `handler_cancellation=True`, so aiohttp cancels
  this handler when the connection drops; `finally` detaches the cursor. Until then the
  sink skips a closing transport. A drain that fails (reset) ends the loop the same way.
- heartbeat: one task for the whole hub (see `app.py`) pushes a `: ping` comment to every
  subscriber every heartbeat_seconds through the same sink, so it never interleaves with
  frames.

Why a plain `web.StreamResponse` and not aiohttp-sse's `EventSourceResponse`: that class
starts a ping task per connection and keeps it, and its `send()` encodes and awaits per
event; measured, it added about 1.9 KiB per idle subscriber, and none of its encoding is
used here (frames are encoded once by the hub).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from .app_keys import FRAMER, HUB, LIMITS, REGISTRY, SETTINGS
from .auth import authorize_watch, end_when_token_expires
from .errors import ApiError, InvalidRequest
from .http_errors import error_response
from .hub import EventLog
from .subscriber_totals import total_subscribers
from .path_params import conversation_id_of
from .transport_sink import TransportSink, limit_unacknowledged_time

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


SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx-style proxies not to buffer the stream
}


async def conversation_events(request: web.Request) -> web.StreamResponse:
    """Serve one subscriber until the conversation ends or the client goes away.

    Deliberately one coroutine with no wrapper: it stays suspended for the whole life of
    the stream, and every frame kept on its stack is memory times the subscriber count.
    """
    try:
        conversation_id = conversation_id_of(request)
        # Before the lookup: without a valid token, not even existence is revealed.
        token_seconds_left = authorize_watch(request, conversation_id)
        conversation = request.app[REGISTRY].get(conversation_id)
        log = conversation.log
        position = resume_position(request, log)
        # No await from here to subscribe(): the subscriber bounds cannot be overshot.
        request.app[LIMITS].admit_subscriber(
            conversation_subscribers=log.subscriber_count,
            total_subscribers=total_subscribers(request.app),
        )
    except ApiError as error:
        return error_response(request, error)
    cursor = log.subscribe(after=position)
    token_expiry = end_when_token_expires(cursor, token_seconds_left)
    response = web.StreamResponse(headers=SSE_HEADERS)
    chunked = request.version >= (1, 1)
    if chunked:
        response.enable_chunked_encoding()
    send_timeout = request.app[SETTINGS].hub.send_timeout
    try:
        writer = await response.prepare(request)
        transport = request.transport
        assert writer is not None and transport is not None
        limit_unacknowledged_time(transport, send_timeout)
        # One write: the headers, the reconnection hint, then the whole replay. The send
        # timeout bounds only waits for a backed-up connection, never the hot path.
        retry_hint = b"retry: %d\n\n" % request.app[SETTINGS].hub.retry_hint_ms
        async with asyncio.timeout(send_timeout):
            await response.write(retry_hint + cursor.take())
        framer = request.app[FRAMER] if chunked else None
        cursor.push_to(TransportSink(transport, request.protocol, framer))
        while not cursor.finished:
            await cursor.wait()
            if cursor.backed_up:
                async with asyncio.timeout(send_timeout):
                    await writer.drain()
                cursor.resume()
    except TimeoutError:
        request.app[HUB].counters.dropped += 1
        logger.info(
            "conversation %s: dropped a subscriber whose writes did not drain in %g s",
            conversation.id, send_timeout, extra={"conversation": conversation.id},
        )
        if request.transport is not None:
            request.transport.abort()
    except ConnectionResetError:
        logger.debug("conversation %s: subscriber went away", conversation.id)
    finally:
        if token_expiry is not None:
            token_expiry.cancel()
        cursor.detach()
    return response
