"""The Server-Sent Events codec: bytes in, events out; events in, frames out.

Pure protocol code with no I/O and no imports from the rest of Chorus, so it can be
tested at every split point and line ending. Decoding follows the WHATWG "event stream
interpretation" algorithm (https://html.spec.whatwg.org/multipage/server-sent-events.html).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LineDecoder", "LineTooLong", "ServerSentEvent", "SSEDecoder", "encode_frame", "encode_comment"]

_BOM = "\ufeff"
DEFAULT_MAX_LINE_BYTES = 8 * 1024 * 1024


class LineTooLong(ValueError):
    """An unterminated line exceeded the decoder's bound (a broken or hostile stream)."""


class LineDecoder:
    """Splits a byte stream into complete lines at CR, LF or CRLF, wherever reads split it.

    A CR at the very end of a read is held back until the next read shows whether an LF
    follows, so CRLF split across two reads is still one line ending.
    """

    __slots__ = ("_buffer", "_pending_cr", "_max_line_bytes")

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self._buffer = bytearray()
        self._pending_cr = False
        self._max_line_bytes = max_line_bytes

    def feed(self, data: bytes) -> list[bytes]:
        """Return the lines completed by `data`, without their line endings.

        Raises LineTooLong when an unterminated line grows past `max_line_bytes`.
        """
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
        # The next CR and LF positions are remembered between lines, so a read with
        # thousands of LF-only lines is scanned once, not once per line.
        cr = buffer.find(b"\r")
        lf = buffer.find(b"\n")
        while cr != -1 or lf != -1:
            if cr == -1 or (lf != -1 and lf < cr):
                lines.append(bytes(buffer[start:lf]))
                start = lf + 1
            elif cr + 1 < end:
                lines.append(bytes(buffer[start:cr]))
                start = cr + 2 if buffer[cr + 1] == 0x0A else cr + 1
            else:
                lines.append(bytes(buffer[start:cr]))
                self._pending_cr = True
                start = end
                break
            if cr != -1 and cr < start:
                cr = buffer.find(b"\r", start)
            if lf != -1 and lf < start:
                lf = buffer.find(b"\n", start)
        del buffer[:start]
        if len(buffer) > self._max_line_bytes:
            buffer.clear()
            raise LineTooLong(f"an SSE line is longer than {self._max_line_bytes} bytes")
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
    discarded, as a browser does, and so is its `id`: `last_event_id` changes only when
    a blank line ends an event (even one with no data), so resuming from it never skips
    the discarded event.
    """

    __slots__ = (
        "_lines", "_data", "_event", "_id_buffer", "_last_id", "_retry", "_seen_first_line"
    )

    def __init__(self) -> None:
        self._lines = LineDecoder()
        self._data: list[str] = []
        self._event = ""
        self._id_buffer: str | None = None
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
        self._id_buffer = self._last_id
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
                self._id_buffer = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        self._last_id = self._id_buffer
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
    if "\n" in event or "\r" in event:
        raise ValueError("an SSE event name must not contain a line break")
    if id is None:
        return b"event: %s\ndata: %s\n\n" % (event.encode(), data)
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (id, event.encode(), data)


def encode_comment(text: str) -> bytes:
    """Encode an SSE comment line (ignored by clients; used for heartbeats)."""
    if "\n" in text or "\r" in text:
        raise ValueError("an SSE comment must not contain a line break")
    return b": %s\n\n" % text.encode()
