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
- client disconnect: the server runs with `handler_cancellation=True`, so aiohttp cancels
  this handler when the connection drops; `finally` detaches the cursor. Until then the
  sink skips a closing transport. A drain that fails (reset) ends the loop the same way.
- heartbeat: one task for the whole hub (see `app.py`) pushes a `: ping` comment to every
  subscriber every heartbeat_seconds through the same sink, so it never interleaves with
  frames. aiohttp-sse's own ping task, one per connection, is switched off: it costs
  about a kilobyte and a timer per subscriber.
"""

from __future__ import annotations

import logging

import asyncio

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp_sse import EventSourceResponse

from .errors import InvalidRequest
from .hub import EventLog

logger = logging.getLogger(__name__)

_MAX_ID_DIGITS = 19
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no", ""}


class ChunkFramer:
    """Frames bytes as one HTTP/1.1 chunk, remembering the last result.

    The hub hands every subscriber at the same position the very same bytes object, so
    one framer shared by all sinks frames each batch once, not once per subscriber.
    """

    __slots__ = ("_last_in", "_last_out")

    def __init__(self) -> None:
        self._last_in = b""
        self._last_out = b""

    def frame(self, data: bytes) -> bytes:
        if data is not self._last_in:
            self._last_in = data
            self._last_out = b"%x\r\n%b\r\n" % (len(data), data)
        return self._last_out


class TransportSink:
    """Writes hub frames straight into one subscriber's chunked HTTP response.

    Used only after the response's headers and first chunk went out through aiohttp, so
    the bytes on the wire stay a valid chunked body; aiohttp's `write_eof()` ends it.
    """

    __slots__ = ("_transport", "_protocol", "_framer")

    def __init__(
        self, transport: asyncio.Transport, protocol: BaseProtocol, framer: ChunkFramer
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._framer = framer

    def send(self, data: bytes) -> bool:
        transport = self._transport
        if transport.is_closing():
            # Gone: aiohttp is cancelling the handler, which will detach the cursor.
            return True
        transport.write(self._framer.frame(data))
        return not self._protocol.writing_paused


class HubPingedResponse(EventSourceResponse):
    """aiohttp-sse's SSE response (headers, chunked body, TCP_USER_TIMEOUT), without its
    per-connection ping task: the hub's single heartbeat pings every subscriber."""

    async def _ping(self) -> None:
        return None


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
    retry_hint_ms: int,
    framer: ChunkFramer,
    label: str,
) -> web.StreamResponse:
    """Serve one subscriber until the log ends or the client goes away."""
    position = resume_position(request, log)
    cursor = log.subscribe(after=position)
    response = HubPingedResponse()
    try:
        writer = await response.prepare(request)
        assert writer is not None and request.transport is not None
        async with response:
            # One write: the headers, the reconnection hint, then the whole replay.
            await response.write(b"retry: %d\n\n" % retry_hint_ms + cursor.take())
            cursor.push_to(TransportSink(request.transport, request.protocol, framer))
            while not cursor.finished:
                await cursor.wait()
                if cursor.backed_up:
                    await writer.drain()
                    cursor.resume()
    except ConnectionResetError:
        logger.debug("%s: subscriber went away", label)
    finally:
        cursor.detach()
    return response
