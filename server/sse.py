"""The Server-Sent Events codec: bytes in, events out; events in, frames out.

Pure protocol code with no I/O and no imports from the rest of Chorus, so it can be
tested at every split point and line ending. Decoding follows the WHATWG "event stream
interpretation" algorithm (https://html.spec.whatwg.org/multipage/server-sent-events.html).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LineDecoder", "ServerSentEvent", "SSEDecoder", "encode_frame", "encode_comment"]

_BOM = "\ufeff"


class LineDecoder:
    """Splits a byte stream into complete lines at CR, LF or CRLF, wherever reads split it.

    A CR at the very end of a read is held back until the next read shows whether an LF
    follows, so CRLF split across two reads is still one line ending.
    """

    __slots__ = ("_buffer", "_pending_cr")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pending_cr = False

    def feed(self, data: bytes) -> list[bytes]:
        """Return the lines completed by `data`, without their line endings."""
        if not data:
            return []
        if self._pending_cr:
            self._pending_cr = False
            if data[:1] == b"\n":
                data = data[1:]
        buffer = self._buffer
        buffer += data
        lines: list[bytes] = []
        start = 0
        end = len(buffer)
        while start < end:
            cr = buffer.find(b"\r", start)
            lf = buffer.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                lines.append(bytes(buffer[start:lf]))
                start = lf + 1
                continue
            lines.append(bytes(buffer[start:cr]))
            if cr + 1 < end:
                start = cr + 2 if buffer[cr + 1] == 0x0A else cr + 1
            else:
                self._pending_cr = True
                start = cr + 1
        del buffer[:start]
        return lines

    def flush(self) -> list[bytes]:
        """Return the unterminated last line, if any (the stream has ended)."""
        self._pending_cr = False
        if not self._buffer:
            return []
        line = bytes(self._buffer)
        self._buffer.clear()
        return [line]


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event. `id` is the last event id in force when it was dispatched."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Turns a byte stream into `ServerSentEvent`s, following the WHATWG algorithm.

    Comment lines (starting with `:`) are ignored, `data:` lines are joined with LF, an
    event with no data lines is not dispatched, `id` containing NUL is ignored, and a
    non-digit `retry` is ignored. An event left unterminated when the stream ends is
    discarded, as a browser does.
    """

    __slots__ = ("_lines", "_data", "_event", "_last_id", "_retry", "_seen_first_line")

    def __init__(self) -> None:
        self._lines = LineDecoder()
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None
        self._retry: int | None = None
        self._seen_first_line = False

    @property
    def last_event_id(self) -> str | None:
        return self._last_id

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        """Return the events completed by `data`."""
        events: list[ServerSentEvent] = []
        for raw in self._lines.feed(data):
            event = self._decode_line(raw)
            if event is not None:
                events.append(event)
        return events

    def flush(self) -> list[ServerSentEvent]:
        """End of stream: process a final unterminated line; a pending event is dropped."""
        for raw in self._lines.flush():
            self._decode_line(raw)
        self._data.clear()
        self._event = ""
        return []

    def _decode_line(self, raw: bytes) -> ServerSentEvent | None:
        line = raw.decode("utf-8", errors="replace")
        if not self._seen_first_line:
            self._seen_first_line = True
            if line.startswith(_BOM):
                line = line[1:]
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = ServerSentEvent(
            data="\n".join(self._data),
            event=self._event or "message",
            id=self._last_id,
            retry=self._retry,
        )
        self._data.clear()
        self._event = ""
        return event


def encode_frame(*, event: str, data: bytes, id: int | None = None) -> bytes:
    """Encode one event as SSE bytes. `data` must be a single line (compact JSON is)."""
    if b"\n" in data or b"\r" in data:
        raise ValueError("SSE frame data must be a single line; encode it as compact JSON")
    if id is None:
        return b"event: %s\ndata: %s\n\n" % (event.encode(), data)
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (id, event.encode(), data)


def encode_comment(text: str) -> bytes:
    """Encode an SSE comment line (ignored by clients; used for heartbeats)."""
    return b": %s\n\n" % text.encode()
