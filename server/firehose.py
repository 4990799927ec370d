"""The firehose: one process-wide log of every conversation's lifecycle and stats.

Owns the system log (a `MemoryEventLog`, so it has sequence numbers, a bounded replay
buffer, cursors and snapshots like a conversation's), the table that log folds its
events into (`FirehoseTable`: what a dashboard shows, rebuilt from the events alone), the
observer that publishes lifecycle events into it, and the `stats` event. The app owns the
one task that calls `publish_stats` every `STATS_SECONDS` ("firehose-stats", app.py).

Observer calls run inline at each lifecycle step, never per chunk but the first, and
never per subscriber: publishing here is one encode and one append.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .conversations import ConversationRegistry
from .errors import NotFound
from .hub import EventLog, Hub, MemoryEventLog
from .observers import TurnOutcome
from .transcript import CANCELLED_STATUS, DONE_STATUS, ERROR_STATUS, STREAMING
from .turn_runner import CHARS_PER_TOKEN

logger = logging.getLogger(__name__)

STATS_SECONDS = 1.0

CREATED = "created"
TURN_STARTED = "turn_started"
FIRST_TOKEN = "first_token"
TURN_DONE = "turn_done"
TURN_ERROR = "turn_error"
CONVERSATION_ENDED = "conversation_ended"
STATS = "stats"
FIREHOSE_EVENT_KINDS = frozenset(
    {CREATED, TURN_STARTED, FIRST_TOKEN, TURN_DONE, TURN_ERROR, CONVERSATION_ENDED, STATS}
)
STATUSES = (STREAMING, DONE_STATUS, ERROR_STATUS, CANCELLED_STATUS)

# What `turn_started` resets and `turn_done` / `turn_error` set, in a row.
_TURN_FIELDS = ("chunks", "tokens", "tokens_estimated", "tokens_per_second", "ttft_seconds",
                "duration_seconds", "finish_reason")


class FirehoseTable:
    """The dashboard table: a row per conversation held, and the latest totals.

    Pure: a fold over the firehose's own events, exactly what a dashboard does with them
    (README, "Multiplexed and firehose streams"), so a `snapshot` of it always agrees
    with the events before it. Bounded by the conversations the registry holds: a row
    comes with `created` and goes with `conversation_ended`.
    """

    __slots__ = ("rows", "totals")

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.totals: dict[str, Any] | None = None

    def apply(self, kind: str, payload: dict[str, Any]) -> None:
        if kind not in FIREHOSE_EVENT_KINDS:
            raise ValueError(f"{kind!r} is not a firehose event kind")
        if kind == STATS:
            self.totals = payload["totals"]
            for part in payload["conversations"]:
                row = self.rows.get(part["conversation"])
                if row is not None:
                    row.update(part)
            return
        conversation_id = payload["conversation"]
        if kind == CREATED:
            self.rows[conversation_id] = {
                "conversation": conversation_id,
                "model": payload["model"],
                "created_at": payload["created_at"],
                "status": STREAMING,
                "turn": None,
                "subscribers": 0,
                "chunks": 0,
                "tokens": 0,
                "tokens_estimated": True,
                "tokens_per_second": None,
                "ttft_seconds": None,
                "duration_seconds": None,
                "finish_reason": None,
                "error": None,
            }
            return
        if kind == CONVERSATION_ENDED:
            self.rows.pop(conversation_id, None)
            return
        row = self.rows.get(conversation_id)
        if row is None:
            return
        if kind == TURN_STARTED:
            row.update(
                status=STREAMING, turn=payload["turn"], model=payload["model"], chunks=0,
                tokens=0, tokens_estimated=True, tokens_per_second=None, ttft_seconds=None,
                duration_seconds=None, finish_reason=None, error=None,
            )
        elif kind == FIRST_TOKEN:
            row["ttft_seconds"] = payload["ttft_seconds"]
        else:  # TURN_DONE, TURN_ERROR
            row.update((name, payload[name]) for name in _TURN_FIELDS)
            row["turn"] = payload["turn"]
            if kind == TURN_DONE:
                row["status"] = DONE_STATUS
                row["error"] = None
            else:
                code = payload["code"]
                row["status"] = CANCELLED_STATUS if code == CANCELLED_STATUS else ERROR_STATUS
                row["error"] = {"code": code, "message": payload["message"]}

    def snapshot(self) -> dict[str, Any]:
        return {"conversations": list(self.rows.values()), "totals": self.totals}

    def count_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for row in self.rows.values():
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return counts


@dataclass(slots=True)
class _TurnClock:
    """Where a conversation's latest turn began in its log, and when (monotonic)."""

    turn: int
    turn_seq: int
    started_at: float
    first_token_at: float | None = None
    ended: bool = False


def _tokens_per_second(tokens: int, seconds: float | None) -> float | None:
    if seconds is None or seconds <= 0:
        return None
    return round(tokens / seconds, 1)


def _generated_chars(log: EventLog, turn: int) -> int:
    turns = log.transcript.turns
    if turn >= len(turns):
        return 0
    return sum(
        len(choice.content) + len(choice.refusal or "") for choice in turns[turn].choices.values()
    )


class Firehose:
    """The system log, fed as a `ConversationObserver` and by `publish_stats()`.

    `log` is what the firehose route subscribes to. After `close()` every call is a no-op
    (the registry's shutdown still reports conversations ending after the firehose has
    closed).
    """

    def __init__(
        self,
        *,
        registry: ConversationRegistry,
        hub: Hub,
        max_events: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._hub = hub
        self._clock = clock
        self._wall_clock = wall_clock
        self.table = FirehoseTable()
        self.log = MemoryEventLog(max_events=max_events, max_bytes=max_bytes, state=self.table)
        # The latest turn of each conversation held: bounded like the registry.
        self._turns: dict[str, _TurnClock] = {}
        counters = hub.counters
        self._rates_since = (clock(), counters.events_published, counters.deliveries)

    def _publish(self, kind: str, payload: dict[str, Any]) -> int | None:
        if self.log.closed:
            return None
        return self.log.publish(kind, payload)

    # --- ConversationObserver -----------------------------------------------------------

    def conversation_created(self, conversation_id: str, model: str) -> None:
        try:
            created_at = self._registry.get(conversation_id).created_at
        except NotFound:
            created_at = self._wall_clock()
        self._publish(
            CREATED, {"conversation": conversation_id, "model": model, "created_at": created_at}
        )

    def turn_started(self, conversation_id: str, turn: int, model: str) -> None:
        log = self._hub.get(conversation_id)
        # Called right after the `turn` event was published: its seq is the log's last.
        turn_seq = log.last_seq if log is not None else 0
        self._turns[conversation_id] = _TurnClock(turn, turn_seq, self._clock())
        self._publish(TURN_STARTED, {"conversation": conversation_id, "turn": turn, "model": model})

    def first_chunk(self, conversation_id: str, turn: int, seconds: float) -> None:
        clock = self._turns.get(conversation_id)
        if clock is not None and clock.turn == turn:
            clock.first_token_at = self._clock()
        self._publish(
            FIRST_TOKEN,
            {"conversation": conversation_id, "turn": turn, "ttft_seconds": round(seconds, 3)},
        )

    def turn_ended(self, outcome: TurnOutcome) -> None:
        conversation_id = outcome.conversation_id
        log = self._hub.get(conversation_id)
        clock = self._turns.get(conversation_id)
        chunks = 0
        if clock is not None and clock.turn == outcome.turn:
            clock.ended = True
            if log is not None:
                # Everything between the `turn` event and this turn's `done` / `error`.
                chunks = max(0, log.last_seq - clock.turn_seq - 1)
        usage = outcome.usage
        tokens = usage.get("completion_tokens") if usage is not None else None
        if not isinstance(tokens, int):
            tokens = 0
        ttft = outcome.first_chunk_seconds
        payload: dict[str, Any] = {
            "conversation": conversation_id,
            "turn": outcome.turn,
            "finish_reason": outcome.finish_reason,
            "usage": usage,
            "chunks": chunks,
            "tokens": tokens,
            "tokens_estimated": usage is None or bool(usage.get("estimated")),
            "ttft_seconds": None if ttft is None else round(ttft, 3),
            "duration_seconds": round(outcome.seconds, 3),
            "tokens_per_second": _tokens_per_second(
                tokens, None if ttft is None else outcome.seconds - ttft
            ),
        }
        if outcome.outcome == "done":
            self._publish(TURN_DONE, payload)
            return
        message = ""
        if log is not None and outcome.turn < len(log.transcript.turns):
            error = log.transcript.turns[outcome.turn].error
            message = error["message"] if error is not None else ""
        self._publish(TURN_ERROR, {**payload, "code": outcome.outcome, "message": message})

    def conversation_ended(self, conversation_id: str, reason: str) -> None:
        self._turns.pop(conversation_id, None)
        self._publish(CONVERSATION_ENDED, {"conversation": conversation_id, "reason": reason})

    # --- stats --------------------------------------------------------------------------

    def publish_stats(self) -> int | None:
        """Publish a `stats` event unless nothing in it changed since the previous one;
        return its seq (None when skipped or closed)."""
        if self.log.closed:
            return None
        now = self._clock()
        counters = self._hub.counters
        since, events_before, deliveries_before = self._rates_since
        self._rates_since = (now, counters.events_published, counters.deliveries)
        elapsed = now - since
        rows = []
        for conversation in self._registry.all():
            row = self.table.rows.get(conversation.id)
            if row is None:
                continue
            part: dict[str, Any] = {
                "conversation": conversation.id,
                "subscribers": conversation.log.subscriber_count,
            }
            clock = self._turns.get(conversation.id)
            if clock is not None and not clock.ended:
                part.update(self._live_turn(conversation.log, clock, now))
            if any(row.get(name) != value for name, value in part.items()):
                rows.append(part)
        totals = {
            "conversations": len(self.table.rows),
            "by_status": self.table.count_by_status(),
            "live_turns": self._registry.live_turns,
            "subscribers": self._hub.subscriber_count,
            "firehose_subscribers": self.log.subscriber_count,
            "events_per_second": _rate(counters.events_published - events_before, elapsed),
            "deliveries_per_second": _rate(counters.deliveries - deliveries_before, elapsed),
        }
        if not rows and totals == self.table.totals:
            return None
        return self._publish(
            STATS,
            {"time": round(self._wall_clock(), 3), "totals": totals, "conversations": rows},
        )

    def _live_turn(self, log: EventLog, clock: _TurnClock, now: float) -> dict[str, Any]:
        """A streaming turn's numbers so far: answer events, estimated tokens, rate."""
        tokens = -(-_generated_chars(log, clock.turn) // CHARS_PER_TOKEN)
        since_first = None if clock.first_token_at is None else now - clock.first_token_at
        return {
            "chunks": max(0, log.last_seq - clock.turn_seq),
            "tokens": tokens,
            "tokens_estimated": True,
            "tokens_per_second": _tokens_per_second(tokens, since_first),
        }

    async def run_stats(self, interval: float) -> None:
        """Publish stats every `interval` seconds until cancelled (the app owns the task)."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.publish_stats()
            except Exception:
                logger.exception("firehose: computing stats failed")

    # --- lifecycle ----------------------------------------------------------------------

    def end_subscribers(self, *, retry_ms: int) -> None:
        """Graceful shutdown: end every firehose stream (`end` "shutdown", `retry:`)."""
        self.log.end_subscribers("shutdown", retry_ms=retry_ms)

    def close(self, reason: str) -> None:
        self.log.close(reason)


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0
