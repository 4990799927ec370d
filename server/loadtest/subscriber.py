"""One load-test subscriber: read a conversation's SSE stream until turn 0 ends.

Owns `SubscriberRecord` (what one subscriber saw, filled in while it reads so that a
cancelled subscriber's partial measurements survive), its event-by-event bookkeeping
(`observe`, pure), `LiveCounters` (the totals the progress line shows) and the coroutine
`run_subscriber`. Bytes are read with `readany()` and decoded by `SSEDecoder`.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from ..sse import LineTooLong, ServerSentEvent, SSEDecoder
from .stats import AnswerDigest, SequenceChecker

__all__ = [
    "CONNECTION_ERROR",
    "DONE",
    "END",
    "FINISHED_TURN",
    "HTTP_ERROR",
    "INTERNAL_ERROR",
    "INTERRUPTED",
    "PROTOCOL_ERROR",
    "TIMEOUT",
    "TURN_ERROR",
    "LiveCounters",
    "SubscriberRecord",
    "run_subscriber",
]

# How a subscriber ended. Only DONE is a success; DONE and TURN_ERROR both mean the whole
# of turn 0 was delivered (the turn itself failed upstream in the second case).
DONE = "done"
TURN_ERROR = "error"
END = "end"
TIMEOUT = "timeout"
INTERRUPTED = "interrupted"
CONNECTION_ERROR = "connection_error"
HTTP_ERROR = "http_error"
PROTOCOL_ERROR = "protocol_error"
INTERNAL_ERROR = "internal_error"
FINISHED_TURN = frozenset({DONE, TURN_ERROR})

_WATCHED_TURN = 0
_WATCHED_CHOICE = 0
_ERROR_BODY_BYTES = 4096
_REQUEST_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(slots=True)
class LiveCounters:
    """Running totals shared by the subscribers of one run, read by the progress line."""

    total: int
    started: int = 0
    connected: int = 0
    finished: int = 0
    events: int = 0


@dataclass(slots=True, kw_only=True)
class SubscriberRecord:
    """What one subscriber measured. Times are `time.monotonic()` seconds."""

    conversation_id: str
    index: int
    outcome: str | None = None
    # More about how it ended: "deleted" for END, "404:conversation_not_found" for HTTP_ERROR
    detail: str | None = None
    requested_at: float | None = None
    connected_at: float | None = None
    first_event_at: float | None = None
    last_event_at: float | None = None
    events: int = 0
    gaps: array[float] = field(default_factory=lambda: array("d"))
    sequence: SequenceChecker = field(default_factory=SequenceChecker)
    answer: AnswerDigest = field(default_factory=AnswerDigest)

    @property
    def time_to_first_event(self) -> float | None:
        if self.requested_at is None or self.first_event_at is None:
            return None
        return self.first_event_at - self.requested_at

    @property
    def error_kind(self) -> str | None:
        """None for a subscriber that ended with `done`; else what went wrong."""
        if self.outcome is None or self.outcome == DONE:
            return None
        return f"{self.outcome}:{self.detail}" if self.detail else self.outcome

    def finish(self, outcome: str, detail: str | None = None) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.detail = detail

    def observe(self, event: ServerSentEvent, now: float) -> bool:
        """Account for one event received at `now`; True when this subscriber is done."""
        self.events += 1
        if self.last_event_at is None:
            self.first_event_at = now
        else:
            self.gaps.append(now - self.last_event_at)
        self.last_event_at = now
        payload = _json_object(event.data)
        if event.event == "end":
            # `end` has no id of its own (the decoder repeats the last one): not counted.
            reason = payload.get("reason") if payload is not None else None
            self.finish(END, reason if isinstance(reason, str) else "unknown")
            return True
        seq = _event_seq(event.id)
        if seq is None:
            self.sequence.feed_invalid()
        else:
            self.sequence.feed(seq, snapshot=event.event == "snapshot")
        if payload is None:
            self.finish(PROTOCOL_ERROR, f"bad_{event.event}_data")
            return True
        if event.event == "snapshot":
            return self._apply_snapshot(payload)
        if payload.get("turn") != _WATCHED_TURN:
            return False
        if event.event == "answer" and payload.get("choice") == _WATCHED_CHOICE:
            content = payload.get("content")
            if isinstance(content, str):
                self.answer.add(content)
        elif event.event == "done":
            self.finish(DONE)
            return True
        elif event.event == "error":
            code = payload.get("code")
            self.finish(TURN_ERROR, code if isinstance(code, str) else "unknown")
            return True
        return False

    def _apply_snapshot(self, payload: dict[str, Any]) -> bool:
        """A snapshot replaces the answer so far; it may show turn 0 already ended."""
        turns = payload.get("turns")
        turn = _find(turns, "turn", _WATCHED_TURN)
        if turn is None:
            return False
        choice = _find(turn.get("choices"), "choice", _WATCHED_CHOICE)
        content = choice.get("content") if choice is not None else None
        self.answer.reset(content if isinstance(content, str) else "")
        status = turn.get("status")
        if status == "done":
            self.finish(DONE)
            return True
        if status in ("error", "cancelled"):
            error = turn.get("error")
            code = error.get("code") if isinstance(error, dict) else None
            self.finish(TURN_ERROR, code if isinstance(code, str) else str(status))
            return True
        return False


def _json_object(data: str) -> dict[str, Any] | None:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _event_seq(raw: str | None) -> int | None:
    if raw is None or not raw.isascii() or not raw.isdigit():
        return None
    return int(raw)


def _find(items: object, key: str, value: int) -> dict[str, Any] | None:
    if not isinstance(items, list):
        return None
    for item in items:
        if isinstance(item, dict) and item.get(key) == value:
            return item
    return None


async def run_subscriber(
    session: aiohttp.ClientSession,
    url: str,
    record: SubscriberRecord,
    counters: LiveCounters,
    *,
    delay: float = 0.0,
) -> None:
    """Connect after `delay` seconds, read until turn 0 ends, and fill in `record`.

    Network and protocol failures end up in `record`; cancellation (the run's time bound,
    Ctrl-C) propagates, and the runner then marks the record as timed out or interrupted.
    """
    if delay > 0:
        await asyncio.sleep(delay)
    record.requested_at = time.monotonic()
    counters.started += 1
    try:
        async with session.get(url, headers=_REQUEST_HEADERS) as response:
            if response.status != 200:
                record.finish(HTTP_ERROR, await _http_error_kind(response))
                return
            record.connected_at = time.monotonic()
            counters.connected += 1
            await _read_events(response, record, counters)
    except aiohttp.ClientError as error:
        record.finish(CONNECTION_ERROR, type(error).__name__)
    except LineTooLong:
        record.finish(PROTOCOL_ERROR, "line_too_long")
    except OSError as error:
        record.finish(CONNECTION_ERROR, type(error).__name__)


async def _read_events(
    response: aiohttp.ClientResponse, record: SubscriberRecord, counters: LiveCounters
) -> None:
    decoder = SSEDecoder()
    while True:
        data = await response.content.readany()
        if not data:
            record.finish(CONNECTION_ERROR, "closed_before_turn_end")
            return
        now = time.monotonic()
        for event in decoder.feed(data):
            counters.events += 1
            if record.observe(event, now):
                return


async def _http_error_kind(response: aiohttp.ClientResponse) -> str:
    """The status, plus Chorus's error code when the (bounded) body has one."""
    kind = str(response.status)
    body = _json_object((await response.content.read(_ERROR_BODY_BYTES)).decode(errors="replace"))
    error = body.get("error") if body is not None else None
    code = error.get("code") if isinstance(error, dict) else None
    return f"{kind}:{code}" if isinstance(code, str) else kind
