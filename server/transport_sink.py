"""Writing hub frames straight into subscribers' HTTP responses, with no await.

Owns the HTTP/1.1 chunk framing of pushed batches and the back-pressure signal (the
transport above its high-water mark). Used by the SSE route once aiohttp has sent the
response headers and the replay, so the bytes on the wire stay one valid body.
"""

from __future__ import annotations

import asyncio
import socket

from aiohttp.base_protocol import BaseProtocol

_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux only


def limit_unacknowledged_time(transport: asyncio.BaseTransport, seconds: float) -> None:
    """Ask the kernel to drop the connection when sent data stays unacknowledged (or the
    peer's window stays shut) for `seconds`: a vanished or frozen client is then noticed
    even on a quiet stream that never fills the send buffer. No-op where unsupported."""
    sock = transport.get_extra_info("socket")
    if _TCP_USER_TIMEOUT is None or sock is None:
        return
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, max(1, int(seconds * 1000)))


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
    """Writes hub frames straight into one subscriber's HTTP response body.

    With `framer` the body is chunked (HTTP/1.1) and each batch becomes one chunk; with
    None (HTTP/1.0) the body is raw and ends when the connection closes. aiohttp's
    `write_eof()` ends a chunked body afterwards.
    """

    __slots__ = ("_transport", "_protocol", "_framer")

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: BaseProtocol,
        framer: ChunkFramer | None,
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._framer = framer

    def send(self, data: bytes) -> bool:
        transport = self._transport
        if transport.is_closing():
            # Gone: aiohttp is cancelling the handler, which will detach the cursor.
            return True
        transport.write(data if self._framer is None else self._framer.frame(data))
        return not self._protocol.writing_paused



