"""One turn: an upstream stream turned into Chorus events on the conversation's log.

Owns the mapping from upstream chunks to `turn` / `answer` / `done` / `error` events and
the judgement of how a stream ended (complete, cut, empty). Every outcome, cancellation
included, ends the turn with exactly one `done` or `error` event.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .chat_chunks import ChatChunk
from .errors import TurnErrorCode, UpstreamFailure
from .hub import EventLog
from .transcript import ANSWER, DONE, ERROR, TURN
from .upstream import IdleTimeout, UpstreamClient

logger = logging.getLogger(__name__)


class _ChoiceTracker:
    """Which choices have appeared and which have their finish_reason."""

    __slots__ = ("finish_reasons", "usage")

    def __init__(self) -> None:
        self.finish_reasons: dict[int, str | None] = {}
        self.usage: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return bool(self.finish_reasons) and all(
            reason is not None for reason in self.finish_reasons.values()
        )

    def ended_choices(self) -> list[dict[str, Any]]:
        return [
            {"choice": index, "finish_reason": reason}
            for index, reason in sorted(self.finish_reasons.items())
            if reason is not None
        ]

    def missing(self) -> str:
        if not self.finish_reasons:
            return "no choice at all"
        open_choices = sorted(i for i, r in self.finish_reasons.items() if r is None)
        return "no finish_reason for choice " + ", ".join(map(str, open_choices))


async def run_turn(
    *,
    client: UpstreamClient,
    log: EventLog,
    turn: int,
    request: dict[str, Any],
    label: str,
) -> None:
    """Stream one answer into `log`. Never raises but CancelledError (after publishing)."""
    log.publish(TURN, {"turn": turn, "model": request["model"]})
    tracker = _ChoiceTracker()

    def on_chunk(chunk: ChatChunk) -> None:
        for choice in chunk.choices:
            if choice.finish_reason is not None or choice.index not in tracker.finish_reasons:
                tracker.finish_reasons[choice.index] = choice.finish_reason
            if choice.has_payload:
                payload: dict[str, Any] = {
                    "turn": turn,
                    "choice": choice.index,
                    "content": choice.content or "",
                }
                if choice.tool_calls:
                    payload["tool_calls"] = choice.tool_calls
                if choice.refusal:
                    payload["refusal"] = choice.refusal
                log.publish(ANSWER, payload)
        if chunk.usage is not None:
            tracker.usage = chunk.usage

    def fail(code: TurnErrorCode, message: str) -> None:
        logger.info("%s: turn %d ended with %s: %s", label, turn, code, message)
        log.publish(
            ERROR,
            {
                "turn": turn,
                "code": str(code),
                "message": message,
                "choices": tracker.ended_choices(),
                "usage": tracker.usage,
            },
        )

    def finish() -> None:
        choices = tracker.ended_choices()
        logger.info(
            "%s: turn %d done (%s)", label, turn, ", ".join(c["finish_reason"] for c in choices)
        )
        log.publish(
            DONE,
            {
                "turn": turn,
                "finish_reason": choices[0]["finish_reason"],
                "usage": tracker.usage,
                "choices": choices,
            },
        )

    try:
        await client.stream(request, on_chunk=on_chunk, label=label)
    except IdleTimeout as timeout:
        if tracker.complete:
            finish()
        else:
            fail(timeout.code, timeout.message)
    except UpstreamFailure as failure:
        fail(failure.code, failure.message)
    except asyncio.CancelledError as cancelled:
        # The canceller says why through Task.cancel(msg).
        reason = str(cancelled.args[0]) if cancelled.args else "the turn was cancelled"
        fail(TurnErrorCode.CANCELLED, reason)
        raise
    except Exception:
        logger.exception("%s: turn %d failed unexpectedly", label, turn)
        fail(TurnErrorCode.INTERNAL, "internal error while streaming the answer")
    else:
        if tracker.complete:
            finish()
        else:
            fail(
                TurnErrorCode.UPSTREAM_PROTOCOL,
                f"upstream stream ended before the answer was complete: {tracker.missing()}",
            )
