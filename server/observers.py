"""Who wants to know about conversations' lifecycles: metrics, the firehose, logs.

A small protocol the registry and the turn runner call at each lifecycle step, and a
fan-out to any number of observers. Observers must be cheap and must not raise: they run
inline, once per step (never per subscriber, never per chunk but the first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnOutcome:
    """How a turn ended. `outcome` is "done" or the `error` event's code."""

    conversation_id: str
    turn: int
    outcome: str
    finish_reason: str | None
    seconds: float
    first_chunk_seconds: float | None
    chunks: int
    usage: dict[str, Any] | None


class ConversationObserver(Protocol):
    def conversation_created(self, conversation_id: str, model: str) -> None: ...

    def turn_started(self, conversation_id: str, turn: int, model: str) -> None: ...

    def first_chunk(self, conversation_id: str, turn: int, seconds: float) -> None: ...

    def turn_ended(self, outcome: TurnOutcome) -> None: ...

    def conversation_ended(self, conversation_id: str, reason: str) -> None: ...


class Observers:
    """Calls every registered observer; one that raises is logged, never propagated."""

    __slots__ = ("_observers",)

    def __init__(self) -> None:
        self._observers: list[ConversationObserver] = []

    def add(self, observer: ConversationObserver) -> None:
        self._observers.append(observer)

    def _each(self, method: str, *args: Any) -> None:
        for observer in self._observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                logger.exception("observer %s.%s failed", type(observer).__name__, method)

    def conversation_created(self, conversation_id: str, model: str) -> None:
        self._each("conversation_created", conversation_id, model)

    def turn_started(self, conversation_id: str, turn: int, model: str) -> None:
        self._each("turn_started", conversation_id, turn, model)

    def first_chunk(self, conversation_id: str, turn: int, seconds: float) -> None:
        self._each("first_chunk", conversation_id, turn, seconds)

    def turn_ended(self, outcome: TurnOutcome) -> None:
        self._each("turn_ended", outcome)

    def conversation_ended(self, conversation_id: str, reason: str) -> None:
        self._each("conversation_ended", conversation_id, reason)
