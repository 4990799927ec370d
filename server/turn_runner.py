"""One turn: an upstream stream turned into Chorus events on the conversation's log.

Owns the mapping from upstream chunks to `turn` / `answer` / `done` / `error` events and
the judgement of how a stream ended (complete, cut, empty). Every outcome, cancellation
included, ends the turn with exactly one `done` or `error` event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .chat_chunks import ChatChunk, ChoiceDelta
from .errors import TurnErrorCode, UpstreamFailure
from .hub import EventLog
from .observers import Observers, TurnOutcome
from .transcript import ANSWER, DONE, ERROR, TURN
from .upstream import IdleTimeout, UpstreamClient

logger = logging.getLogger(__name__)


CHARS_PER_TOKEN = 4  # the usage estimate when upstream reports none


def _payload_chars(choice: ChoiceDelta) -> int:
    count = len(choice.content or "") + len(choice.refusal or "")
    for call in choice.tool_calls or ():
        function = call.get("function")
        if isinstance(function, dict):
            count += sum(len(v) for v in function.values() if isinstance(v, str))
    return count


def _prompt_chars(request: dict[str, Any]) -> int:
    count = 0
    for message in request.get("messages", ()):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            count += len(content)
        elif isinstance(content, list):
            count += sum(
                len(part["text"]) for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return count


class _Turn:
    """The state of one turn while it streams, and the events it publishes."""

    __slots__ = ("_log", "_turn", "_label", "_finish_reasons", "_usage", "_prompt_chars",
                 "_generated_chars", "chunks", "first_chunk_at", "_on_first_chunk", "_extra")

    def __init__(
        self, log: EventLog, turn: int, label: str, *, prompt_chars: int,
        log_extra: dict[str, str] | None = None,
    ) -> None:
        self._log = log
        self._turn = turn
        self._label = label
        self._extra = log_extra
        # Every choice that appeared, with its finish_reason once it has one.
        self._finish_reasons: dict[int, str | None] = {}
        self._usage: dict[str, Any] | None = None
        self._prompt_chars = prompt_chars
        self._generated_chars = 0
        self.chunks = 0
        self.first_chunk_at: float | None = None
        self._on_first_chunk: Callable[[], None] | None = None

    @property
    def complete(self) -> bool:
        reasons = self._finish_reasons
        return bool(reasons) and all(reason is not None for reason in reasons.values())

    def on_chunk(self, chunk: ChatChunk) -> None:
        self.chunks += 1
        if self.first_chunk_at is None:
            self.first_chunk_at = time.monotonic()
            if self._on_first_chunk is not None:
                self._on_first_chunk()
        for choice in chunk.choices:
            if choice.finish_reason is not None or choice.index not in self._finish_reasons:
                self._finish_reasons[choice.index] = choice.finish_reason
            if choice.has_payload:
                self._generated_chars += _payload_chars(choice)
                payload: dict[str, Any] = {
                    "turn": self._turn,
                    "choice": choice.index,
                    "content": choice.content or "",
                }
                if choice.tool_calls:
                    payload["tool_calls"] = choice.tool_calls
                if choice.refusal:
                    payload["refusal"] = choice.refusal
                self._log.publish(ANSWER, payload)
        if chunk.usage is not None:
            self._usage = chunk.usage

    def usage(self) -> dict[str, Any]:
        """What upstream reported, else an estimate (about 4 characters a token) marked
        `"estimated": true`, so a cut or cancelled turn still records what it cost."""
        if self._usage is not None:
            return self._usage
        prompt = -(-self._prompt_chars // CHARS_PER_TOKEN)
        completion = -(-self._generated_chars // CHARS_PER_TOKEN)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "estimated": True,
        }

    def _ended_choices(self) -> list[dict[str, Any]]:
        return [
            {"choice": index, "finish_reason": reason}
            for index, reason in sorted(self._finish_reasons.items())
            if reason is not None
        ]

    def _missing(self) -> str:
        if not self._finish_reasons:
            return "no choice at all"
        still_open = sorted(i for i, r in self._finish_reasons.items() if r is None)
        return "no finish_reason for choice " + ", ".join(map(str, still_open))

    @property
    def finish_reason(self) -> str | None:
        ended = self._ended_choices()
        return ended[0]["finish_reason"] if ended else None

    def finish(self) -> None:
        choices = self._ended_choices()
        logger.info(
            "%s: turn %d done (%s)",
            self._label, self._turn, ", ".join(c["finish_reason"] for c in choices),
            extra=self._extra,
        )
        self._log.publish(
            DONE,
            {
                "turn": self._turn,
                "finish_reason": choices[0]["finish_reason"],
                "usage": self.usage(),
                "choices": choices,
            },
        )

    def fail(self, code: TurnErrorCode, message: str) -> None:
        logger.info(
            "%s: turn %d ended with %s: %s", self._label, self._turn, code, message,
            extra=self._extra,
        )
        self._log.publish(
            ERROR,
            {
                "turn": self._turn,
                "code": str(code),
                "message": message,
                "choices": self._ended_choices(),
                "usage": self.usage(),
            },
        )

    def end_of_stream(self) -> None:
        if self.complete:
            self.finish()
        else:
            self.fail(
                TurnErrorCode.UPSTREAM_PROTOCOL,
                f"upstream stream ended before the answer was complete: {self._missing()}",
            )


def start_turn_event(log: EventLog, turn: int, model: str) -> None:
    """Publish (and flush) a turn's `turn` event. Done synchronously when the turn is
    started, not in its task: a task cancelled before its first step would otherwise leave
    the log without the turn, and every later turn out of order."""
    log.publish(TURN, {"turn": turn, "model": model})
    log.flush()


def end_unstarted_turn(log: EventLog, turn: int, reason: str) -> None:
    """A turn whose task was cancelled before it ever ran: give it its `error` event."""
    log.publish(
        ERROR,
        {
            "turn": turn,
            "code": str(TurnErrorCode.CANCELLED),
            "message": reason,
            "choices": [],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                      "estimated": True},
        },
    )
    log.flush()


async def run_turn(
    *,
    client: UpstreamClient,
    log: EventLog,
    turn: int,
    request: dict[str, Any],
    label: str,
    conversation_id: str = "",
    observers: Observers | None = None,
) -> None:
    """Stream one answer into `log`, whose `turn` event `start_turn` has already published.
    Never raises but CancelledError (after publishing the turn's `error`)."""
    observers = observers or Observers()
    started = time.monotonic()
    observers.turn_started(conversation_id, turn, request["model"])
    # Log records carry the id as a field too (the JSON log format's `conversation`).
    log_extra = {"conversation": conversation_id} if conversation_id else None
    state = _Turn(log, turn, label, prompt_chars=_prompt_chars(request), log_extra=log_extra)
    logger.info("%s: turn %d started (model %s)", label, turn, request["model"], extra=log_extra)
    state._on_first_chunk = lambda: observers.first_chunk(
        conversation_id, turn, time.monotonic() - started
    )
    try:
        await client.stream(request, on_chunk=state.on_chunk, label=label, after_read=log.flush)
    except IdleTimeout as timeout:
        if state.complete:
            state.finish()
        else:
            state.fail(timeout.code, timeout.message)
    except UpstreamFailure as failure:
        state.fail(failure.code, failure.message)
    except asyncio.CancelledError as cancelled:
        # The canceller says why through Task.cancel(msg).
        reason = str(cancelled.args[0]) if cancelled.args else "the turn was cancelled"
        state.fail(TurnErrorCode.CANCELLED, reason)
        raise
    except Exception:
        logger.exception("%s: turn %d failed unexpectedly", label, turn, extra=log_extra)
        state.fail(TurnErrorCode.INTERNAL, "internal error while streaming the answer")
    else:
        state.end_of_stream()
    finally:
        # Whatever happened, what was published reaches the subscribers in this loop turn.
        log.flush()
        ended = log.transcript.turns[turn] if turn < len(log.transcript.turns) else None
        observers.turn_ended(
            TurnOutcome(
                conversation_id=conversation_id,
                turn=turn,
                outcome=(ended.error or {}).get("code", "done") if ended else "unknown",
                finish_reason=state.finish_reason,
                seconds=time.monotonic() - started,
                first_chunk_seconds=(
                    None if state.first_chunk_at is None else state.first_chunk_at - started
                ),
                chunks=state.chunks,
                usage=ended.usage if ended else None,
            )
        )
