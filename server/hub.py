"""The hub: per conversation, a sequenced event log with encoded frames and cursors.

Owns sequence numbers, the bounded replay buffer, the encoded SSE frames, the cursors of
the subscribers and the conversation's transcript (so it can produce a `snapshot`).
Knows no HTTP and no model. The HTTP layer talks to it only through the `Hub` and
`EventLog` protocols below, so a second backend can be added behind them.

Each event is encoded to SSE bytes once, at publish time. A subscriber is a `Cursor`: the
sequence number it has been handed up to, nothing more. Whatever it has not been handed
yet is read straight from the shared log, so a slow subscriber costs the others nothing,
and what it holds in flight is bounded by the log's own bounds.

Delivery is pushed: `publish` appends and `flush` (called by the publisher after a batch,
or by the loop right after) writes the new frames straight into every subscriber's `Sink`
in the same loop turn, one write per subscriber per batch, with no task switch. Only a
subscriber whose connection is backed up leaves the push path: its owner waits for the
connection to drain and then `resume()`s it, which hands over everything it missed as one
write (or one snapshot). Subscribers at the same position share the same joined bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson

from .sse import encode_comment, encode_frame
from .transcript import Transcript


class Sink(Protocol):
    """Where a pushed cursor writes: a subscriber's connection."""

    def send(self, data: bytes) -> bool:
        """Write `data` now, without waiting. Return False when the connection is backed up
        (nothing more is pushed until its owner drains it and resumes the cursor).

        Must not detach the cursor or publish: it runs inside the log's delivery loop.
        """


class Cursor(Protocol):
    """One subscriber's position in a conversation's log.

    Two ways to consume it: pull (`wait()` then `take()`, in a loop), or push (`push_to(sink)`
    once; then `wait()` returns only when the owner must act: the sink is backed up, so
    drain it and `resume()`; or the cursor is finished).
    """

    @property
    def position(self) -> int:
        """The last sequence number handed over (0 before any)."""

    @property
    def finished(self) -> bool:
        """True once the `end` frame has been handed over: nothing more will come."""

    def take(self) -> bytes:
        """Everything pending, as one joined run of SSE frames (b"" when none).

        The frames after `position` when the log still holds them all, else one
        `snapshot` frame; followed by the `end` frame once the log is closed.
        """

    def wait(self) -> Awaitable[None]:
        """Pull mode: done once `take()` has something. Push mode: once the cursor is
        backed up or finished. Done at once if that is already so, or if detached.

        A plain awaitable, not a coroutine: the owner awaits it for the whole life of an
        idle stream, and a coroutine frame per subscriber is memory for nothing."""

    @property
    def backed_up(self) -> bool:
        """Push mode: the sink refused more; drain the connection, then `resume()`."""

    def push_to(self, sink: Sink) -> None:
        """Switch to push delivery: send what is pending now, then every new batch."""

    def resume(self) -> None:
        """After draining a backed-up sink: send everything missed as one write."""

    def end(self, reason: str, *, retry_ms: int | None = None) -> None:
        """End this one subscriber: after what it has pending, an `end` frame with `reason`
        (and a `retry:` hint when given); then it is finished. The log goes on."""

    def detach(self) -> None:
        """Stop following the log. Idempotent."""


class LogState(Protocol):
    """What a log folds its events into, so that a subscriber the replay buffer has left
    behind is handed the state as of `last_seq` (one `snapshot` frame) instead of a gap.
    A conversation's log folds into its `Transcript`; the firehose has its own table."""

    def apply(self, kind: str, payload: dict[str, Any]) -> None:
        """Fold one event in. Raises ValueError for a kind it does not know or an event
        out of order (the event is then not published)."""

    def snapshot(self) -> dict[str, Any]:
        """The `snapshot` frame's fields besides `seq`."""


class EventLog(Protocol):
    """One conversation's sequenced events."""

    @property
    def last_seq(self) -> int: ...

    @property
    def first_buffered_seq(self) -> int: ...

    @property
    def subscriber_count(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    @property
    def transcript(self) -> Transcript: ...

    def publish(self, kind: str, payload: dict[str, Any]) -> int:
        """Append an event, encoded once; return its sequence number. Subscribers get it at
        the next `flush()`, which the loop runs right after the current callback at the
        latest."""

    def flush(self) -> None:
        """Deliver everything published so far to every subscriber, now."""

    def subscribe(self, *, after: int) -> Cursor:
        """Attach a cursor that will be handed every event after `after`, with no gap.

        Raises ValueError when `after` is negative or beyond `last_seq`.
        """

    def snapshot(self) -> dict[str, Any]:
        """`{"seq": last_seq, "turns": [...]}`: the whole conversation as of `last_seq`."""

    def close(self, reason: str) -> None:
        """Hand every subscriber the `end` frame with `reason`; publishing is over."""

    def heartbeat(self, frame: bytes) -> None:
        """Push `frame` (a comment) to every pushed subscriber that is not backed up."""

    def on_subscribers_changed(self, callback: Callable[[int], None] | None) -> None:
        """Call `callback(count)` whenever a subscriber attaches or detaches."""

    def end_subscribers(self, reason: str, *, retry_ms: int | None = None) -> None:
        """End every current subscriber (see `Cursor.end`); the log itself goes on."""


class Hub(Protocol):
    """Where conversations' logs live."""

    def open(self, conversation_id: str) -> EventLog:
        """Create the log of a new conversation. Raises KeyError if it exists."""

    def get(self, conversation_id: str) -> EventLog | None: ...

    def discard(self, conversation_id: str) -> None:
        """Close (reason `deleted` unless already closed) and forget the log."""

    @property
    def subscriber_count(self) -> int: ...

    @property
    def counters(self) -> SubscriberTally:
        """This process's running totals, for metrics; the SSE route adds its drops."""

    def heartbeat(self) -> None:
        """Send the `: ping` comment to every subscriber of every conversation."""


HEARTBEAT_FRAME = encode_comment("ping")


class SubscriberTally:
    """Counters shared by a hub's logs: the cursors attached now (kept as cursors attach
    and detach, so the hub's total, checked per new subscriber, is O(1)) and running
    totals for metrics. Plain integer additions, once per batch, never per byte."""

    __slots__ = ("count", "events_published", "deliveries", "bytes_sent", "replays",
                 "snapshots", "dropped")

    def __init__(self) -> None:
        self.count = 0
        self.events_published = 0
        self.deliveries = 0  # (event, subscriber) pairs handed to a connection
        self.bytes_sent = 0  # event bytes handed to connections (heartbeats excluded)
        self.replays = 0  # subscribers that attached behind the live edge
        self.snapshots = 0  # snapshot frames sent instead of a replay
        self.dropped = 0  # subscribers dropped by their SSE handler: writes did not drain


class MemoryCursor:
    """A cursor into a `MemoryEventLog`: a position, a sink once pushed, a future while
    its owner waits."""

    __slots__ = ("_log", "_position", "_finished", "_waiter", "_attached", "_sink",
                 "_backed_up", "_ending")

    def __init__(self, log: MemoryEventLog, position: int) -> None:
        self._log = log
        self._position = position
        self._finished = False
        self._waiter: asyncio.Future[None] | None = None
        self._attached = True
        self._sink: Sink | None = None
        self._backed_up = False
        # The `end` frame this subscriber gets when it is ended on its own (see `end`).
        self._ending: bytes | None = None

    @property
    def position(self) -> int:
        return self._position

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def backed_up(self) -> bool:
        return self._backed_up

    def _end_frame(self) -> bytes | None:
        if self._ending is not None:
            return self._ending
        return self._log.end_frame() if self._log.closed else None

    def has_pending(self) -> bool:
        if self._finished:
            return False
        return self._position < self._log.last_seq or self._end_frame() is not None

    def take(self) -> bytes:
        if self._finished:
            return b""
        log = self._log
        data = b""
        if self._position < log.last_seq:
            data = log.pending_after(self._position)
            log.count_delivery(log.last_seq - self._position, len(data))
            self._position = log.last_seq
        end = self._end_frame()
        if end is not None:
            self._finished = True
            data += end
        return data

    def end(self, reason: str, *, retry_ms: int | None = None) -> None:
        if self._finished or self._ending is not None:
            return
        frame = encode_frame(event="end", data=orjson.dumps({"reason": reason}))
        self._ending = frame if retry_ms is None else b"retry: %d\n%b" % (retry_ms, frame)
        self._deliver_end()

    def _deliver_end(self) -> None:
        """Hand over what is pending and the end frame now if the sink can take it; either
        way wake the owner, who returns once the cursor is finished."""
        sink = self._sink
        if sink is not None and not self._backed_up and not self._finished:
            data = self.take()
            if data and not sink.send(data):
                self._backed_up = True
        self.wake()

    def push_to(self, sink: Sink) -> None:
        if self._sink is not None:
            raise RuntimeError("push_to() called twice; a cursor has one sink")
        self._sink = sink
        self.resume()

    def resume(self) -> None:
        sink = self._sink
        if sink is None:
            raise RuntimeError("resume() before push_to(); give the cursor a sink first")
        self._backed_up = False
        data = self.take()
        if data and not sink.send(data):
            self._backed_up = True

    def _needs_owner(self) -> bool:
        if not self._attached or self._finished:
            return True
        if self._sink is None:
            return self.has_pending()
        return self._backed_up

    def wait(self) -> asyncio.Future[None]:
        waiter = self._waiter
        if waiter is None or waiter.done():
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        if self._needs_owner():
            waiter.set_result(None)
        return waiter

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def detach(self) -> None:
        if self._attached:
            self._attached = False
            self._log.forget(self)
            self.wake()


class MemoryEventLog:
    """An in-process event log bounded by a count and a byte size.

    The newest event is always kept, even when it alone exceeds the byte bound, so a
    live subscriber is never forced into a snapshot by one large event.
    """

    __slots__ = (
        "_frames", "_head", "_first_seq", "_last_seq", "_bytes", "_max_events",
        "_max_bytes", "_cursors", "_transcript", "_closed_reason", "_snapshot_cache",
        "_end_frame", "_flush_handle", "_on_subscribers_changed", "_tally", "_state",
    )

    def __init__(
        self,
        *,
        max_events: int,
        max_bytes: int,
        tally: SubscriberTally | None = None,
        state: LogState | None = None,
    ) -> None:
        """`state`: what the events fold into and `snapshot()` reports; by default the
        conversation's `transcript` (a log with its own state keeps an empty transcript)."""
        if max_events < 1 or max_bytes < 1:
            raise ValueError("a log must be able to hold at least one event")
        self._frames: list[bytes] = []
        self._head = 0  # index in _frames of the oldest buffered event
        self._first_seq = 1
        self._last_seq = 0
        self._bytes = 0
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._cursors: set[MemoryCursor] = set()
        self._transcript = Transcript()
        self._state: LogState = self._transcript if state is None else state
        self._closed_reason: str | None = None
        self._snapshot_cache: tuple[int, bytes] | None = None
        self._end_frame: bytes | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._on_subscribers_changed: Callable[[int], None] | None = None
        self._tally = tally if tally is not None else SubscriberTally()

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def first_buffered_seq(self) -> int:
        return self._first_seq

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    @property
    def subscriber_count(self) -> int:
        return len(self._cursors)

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    @property
    def transcript(self) -> Transcript:
        return self._transcript

    def publish(self, kind: str, payload: dict[str, Any]) -> int:
        if self._closed_reason is not None:
            raise RuntimeError("publish() on a closed log; open a new conversation instead")
        self._state.apply(kind, payload)
        seq = self._last_seq + 1
        frame = encode_frame(event=kind, data=orjson.dumps(payload), id=seq)
        self._last_seq = seq
        self._frames.append(frame)
        self._bytes += len(frame)
        self._tally.events_published += 1
        self._evict()
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)
        return seq

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        last_seq = self._last_seq
        # Subscribers at the same position get the very same bytes object, so the
        # join (and the sink's framing of it) is done once per position, not per cursor.
        shared_position = -1
        shared = b""
        shared_is_snapshot = False
        deliveries = sent = 0
        for cursor in self._cursors:
            sink = cursor._sink
            if sink is None:
                if cursor.has_pending():
                    cursor.wake()
                continue
            position = cursor._position
            if cursor._backed_up or cursor._finished or position >= last_seq:
                continue
            if position != shared_position:
                shared = self.pending_after(position)  # counts a snapshot, once
                shared_position = position
                shared_is_snapshot = position + 1 < self._first_seq
            elif shared_is_snapshot:
                self._tally.snapshots += 1  # the same snapshot, to one more subscriber
            deliveries += last_seq - position
            sent += len(shared)
            cursor._position = last_seq
            if not sink.send(shared):
                cursor._backed_up = True
                cursor.wake()
        self._tally.deliveries += deliveries  # summed here: once per batch, not per cursor
        self._tally.bytes_sent += sent

    def _evict(self) -> None:
        frames = self._frames
        while len(frames) - self._head > 1 and (
            len(frames) - self._head > self._max_events or self._bytes > self._max_bytes
        ):
            self._bytes -= len(frames[self._head])
            frames[self._head] = b""
            self._head += 1
            self._first_seq += 1
        if self._head > 1024 and self._head * 2 > len(frames):
            del frames[: self._head]
            self._head = 0

    def count_delivery(self, events: int, size: int) -> None:
        self._tally.deliveries += events
        self._tally.bytes_sent += size

    def pending_after(self, position: int) -> bytes:
        """What a subscriber at `position` is missing: the frames after it, or a snapshot
        when `position + 1` has left the buffer."""
        if position == self._last_seq - 1 and self._head < len(self._frames):
            return self._frames[-1]
        if position + 1 < self._first_seq:
            self._tally.snapshots += 1
            return self.snapshot_frame()
        return self.frames_after(position)

    def frames_after(self, position: int) -> bytes:
        """The buffered frames after `position`, joined. `position + 1` must be buffered."""
        start = self._head + position + 1 - self._first_seq
        if start < self._head:
            raise ValueError(f"event {position + 1} is no longer buffered")
        return b"".join(self._frames[start:])

    def snapshot(self) -> dict[str, Any]:
        return {"seq": self._last_seq, **self._state.snapshot()}

    def snapshot_frame(self) -> bytes:
        cached = self._snapshot_cache
        if cached is not None and cached[0] == self._last_seq:
            return cached[1]
        frame = encode_frame(
            event="snapshot", data=orjson.dumps(self.snapshot()), id=self._last_seq
        )
        self._snapshot_cache = (self._last_seq, frame)
        return frame

    def end_frame(self) -> bytes:
        if self._end_frame is None:
            raise RuntimeError("end_frame() before close()")
        return self._end_frame

    def subscribe(self, *, after: int) -> MemoryCursor:
        if after < 0 or after > self._last_seq:
            raise ValueError(f"position {after} is outside 0..{self._last_seq}")
        cursor = MemoryCursor(self, after)
        self._cursors.add(cursor)
        self._tally.count += 1
        if after < self._last_seq:
            self._tally.replays += 1
        if self._on_subscribers_changed is not None:
            self._on_subscribers_changed(len(self._cursors))
        return cursor

    def forget(self, cursor: MemoryCursor) -> None:
        if cursor in self._cursors:
            self._cursors.remove(cursor)
            self._tally.count -= 1
        if self._on_subscribers_changed is not None:
            self._on_subscribers_changed(len(self._cursors))

    def on_subscribers_changed(self, callback: Callable[[int], None] | None) -> None:
        self._on_subscribers_changed = callback

    def end_subscribers(self, reason: str, *, retry_ms: int | None = None) -> None:
        for cursor in list(self._cursors):
            cursor.end(reason, retry_ms=retry_ms)

    def heartbeat(self, frame: bytes) -> None:
        for cursor in self._cursors:
            sink = cursor._sink
            # A backed-up subscriber already has bytes on the way; no need to add more.
            if sink is not None and not cursor._backed_up and not cursor._finished:
                if not sink.send(frame):
                    cursor._backed_up = True
                    cursor.wake()

    def close(self, reason: str) -> None:
        if self._closed_reason is not None:
            return
        self.flush()
        self._closed_reason = reason
        self._end_frame = encode_frame(event="end", data=orjson.dumps({"reason": reason}))
        for cursor in list(self._cursors):
            cursor._deliver_end()


class MemoryHub:
    """Conversation logs held in this process."""

    def __init__(self, *, buffer_events: int, buffer_bytes: int) -> None:
        self._buffer_events = buffer_events
        self._buffer_bytes = buffer_bytes
        self._logs: dict[str, MemoryEventLog] = {}
        # Includes the subscribers of discarded logs until their handlers detach them.
        self._tally = SubscriberTally()

    def open(self, conversation_id: str) -> MemoryEventLog:
        if conversation_id in self._logs:
            raise KeyError(f"conversation {conversation_id} already has a log")
        log = MemoryEventLog(
            max_events=self._buffer_events, max_bytes=self._buffer_bytes, tally=self._tally
        )
        self._logs[conversation_id] = log
        return log

    def get(self, conversation_id: str) -> MemoryEventLog | None:
        return self._logs.get(conversation_id)

    def discard(self, conversation_id: str) -> None:
        log = self._logs.pop(conversation_id, None)
        if log is not None:
            log.close("deleted")

    @property
    def subscriber_count(self) -> int:
        return self._tally.count

    @property
    def counters(self) -> SubscriberTally:
        """Running totals for metrics (read only, please)."""
        return self._tally

    def heartbeat(self) -> None:
        for log in self._logs.values():
            log.heartbeat(HEARTBEAT_FRAME)
