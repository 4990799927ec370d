"""Many conversations' frames re-tagged into one stream: the combined stream's codec.

Pure: no I/O, no hub, no HTTP. It reads only Chorus's own frames (what `hub.py` encodes:
an optional `retry:` line, then `id:`, `event:` and one `data:` line of compact JSON, then
a blank line) and writes each one again with the conversation it belongs to spliced into
its JSON, byte for byte otherwise, and with an `id:` that is the whole stream's position.

The position is one entry per conversation, in the order the client listed them: the
seq of the last event handed over, or `x` once that conversation's end was handed over.
`"12.7.x"` is what `Last-Event-ID` brings back, so resuming needs nothing remembered on
the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from .path_params import CONVERSATION_ID
from .sse import encode_frame

MAX_CONVERSATIONS = 50
ENDED = "x"
NOT_FOUND = "not_found"
CONVERSATION_END = b"conversation_end"
_SNAPSHOT = b"snapshot"
_END = b"end"
_MAX_POSITION_DIGITS = 19


class InvalidIds(ValueError):
    """The `conversations` list is malformed (the message says how)."""


class InvalidPosition(ValueError):
    """A combined stream position (`Last-Event-ID`, `?after=`) is malformed."""


def parse_conversation_ids(raw: str) -> list[str]:
    """`a,b,c` → `["a", "b", "c"]`: 1 to MAX_CONVERSATIONS distinct well-formed ids.

    Raises InvalidIds otherwise. Ids are URL-safe, so they go into JSON unescaped.
    """
    ids = [part.strip() for part in raw.split(",")]
    if ids == [""]:
        raise InvalidIds("conversations must list 1 to 50 conversation ids, comma-separated")
    if len(ids) > MAX_CONVERSATIONS:
        raise InvalidIds(f"at most {MAX_CONVERSATIONS} conversations per stream, got {len(ids)}")
    for conversation_id in ids:
        if not CONVERSATION_ID.fullmatch(conversation_id):
            raise InvalidIds(f"{conversation_id[:70]!r} is not a conversation id")
    if len(set(ids)) != len(ids):
        raise InvalidIds("a conversation is listed twice")
    return ids


Position = int | None  # the seq handed over up to, or None once the conversation ended


def parse_position(raw: str, count: int) -> list[Position]:
    """`"12.7.x"` → `[12, 7, None]`; exactly `count` entries, each digits or `x`.

    Raises InvalidPosition otherwise. Whether each seq exists is the caller's to check.
    """
    parts = raw.strip().split(".")
    if len(parts) != count:
        raise InvalidPosition(
            f"must have one entry per conversation ({count}), joined by '.', not {len(parts)}"
        )
    positions: list[Position] = []
    for part in parts:
        if part == ENDED:
            positions.append(None)
        elif part.isascii() and part.isdigit() and len(part) <= _MAX_POSITION_DIGITS:
            positions.append(int(part))
        else:
            raise InvalidPosition(f"entry {part[:30]!r} is neither an event number nor 'x'")
    return positions


def format_position(positions: Sequence[Position]) -> bytes:
    return b".".join(b"x" if p is None else b"%d" % p for p in positions)


@dataclass(frozen=True, slots=True)
class Frame:
    """One of our own frames, taken apart. `data` is the raw JSON object."""

    event: bytes
    data: bytes
    id: int | None = None
    retry: int | None = None


def split_frames(data: bytes) -> list[Frame]:
    """Take apart a run of frames as the hub encodes them (`Cursor.take()`'s bytes).

    Raises ValueError on anything else: these bytes never come from outside.
    """
    frames: list[Frame] = []
    for block in data.split(b"\n\n"):
        if not block:
            continue
        event = payload = None
        seq = retry = None
        for line in block.split(b"\n"):
            name, _, value = line.partition(b": ")
            if name == b"id":
                seq = int(value)
            elif name == b"event":
                event = value
            elif name == b"data":
                payload = value
            elif name == b"retry":
                retry = int(value)
            else:
                raise ValueError(f"not a hub frame line: {line[:80]!r}")
        if event is None or payload is None or not payload.startswith(b"{"):
            raise ValueError(f"not a hub frame: {block[:80]!r}")
        frames.append(Frame(event=event, data=payload, id=seq, retry=retry))
    return frames


def _tagged(conversation_id: bytes, seq: int | None, data: bytes) -> bytes:
    """`{"conversation":"<id>","seq":N,` spliced in front of the object's own fields."""
    head = b'{"conversation":"%b"' % conversation_id
    if seq is not None:
        head += b',"seq":%d' % seq
    rest = data[1:]
    return head + (rest if rest == b"}" else b"," + rest)


class Multiplexer:
    """The combined stream of several conversations: where each one is, which have ended,
    and their frames re-tagged.

    `retag(i, frames)` turns what conversation `i`'s cursor handed over into the combined
    stream's frames, each with the position after it as its id. A conversation's `end`
    becomes `conversation_end` (with an id: it is part of the position); once every
    conversation has ended, `end_frame()` is the combined stream's own `end`.
    """

    __slots__ = ("_ids", "_positions", "_open", "_last_reason", "_last_retry")

    def __init__(self, conversation_ids: Sequence[str], positions: Sequence[Position]) -> None:
        if len(conversation_ids) != len(positions):
            raise ValueError("one position per conversation")
        self._ids = [conversation_id.encode() for conversation_id in conversation_ids]
        self._positions = list(positions)
        self._open = sum(1 for p in positions if p is not None)
        self._last_reason = NOT_FOUND
        self._last_retry: int | None = None

    @property
    def position(self) -> bytes:
        """The id of the stream's latest event: every conversation's position."""
        return format_position(self._positions)

    @property
    def all_ended(self) -> bool:
        return self._open == 0

    def retag(self, index: int, data: bytes) -> bytes:
        if self._positions[index] is None:
            raise RuntimeError("retag() after that conversation's end; stop taking from it")
        out = []
        conversation_id = self._ids[index]
        for frame in split_frames(data):
            if frame.event == _END:
                reason = orjson.loads(frame.data).get("reason")
                out.append(self._conversation_end(index, str(reason), retry=frame.retry))
                break  # nothing follows an end
            if frame.id is None:
                raise ValueError(f"a {frame.event!r} frame without an id")
            self._positions[index] = frame.id
            seq = None if frame.event == _SNAPSHOT else frame.id  # a snapshot has its own seq
            out.append(
                b"id: %b\nevent: %b\ndata: %b\n\n"
                % (self.position, frame.event, _tagged(conversation_id, seq, frame.data))
            )
        return b"".join(out)

    def not_found(self, index: int) -> bytes:
        """The `conversation_end` of a conversation that is not held (any more)."""
        return self._conversation_end(index, NOT_FOUND, retry=None)

    def _conversation_end(self, index: int, reason: str, *, retry: int | None) -> bytes:
        if self._positions[index] is None:
            return b""
        self._positions[index] = None
        self._open -= 1
        self._last_reason = reason
        self._last_retry = retry
        data = _tagged(self._ids[index], None, orjson.dumps({"reason": reason}))
        return b"id: %b\nevent: %b\ndata: %b\n\n" % (self.position, CONVERSATION_END, data)

    def end_frame(self) -> bytes:
        """The combined stream's own `end`, once every conversation has ended: the last
        one's reason (and its `retry:` hint, e.g. on shutdown). No id."""
        if not self.all_ended:
            raise RuntimeError("end_frame() while conversations are still followed")
        frame = encode_frame(event="end", data=orjson.dumps({"reason": self._last_reason}))
        return frame if self._last_retry is None else b"retry: %d\n%b" % (self._last_retry, frame)
