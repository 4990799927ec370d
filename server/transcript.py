"""The conversation's answer state, rebuilt from its events.

Pure: a reducer over Chorus events (`turn`, `answer`, `done`, `error`). The hub applies
every published event here, so the state always matches the latest sequence number and
a subscriber that fell out of the replay buffer can be sent a `snapshot` instead.
Knows the Chorus event vocabulary, not OpenAI's wire format and not HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TURN = "turn"
ANSWER = "answer"
DONE = "done"
ERROR = "error"
LOG_EVENT_KINDS = frozenset({TURN, ANSWER, DONE, ERROR})

STREAMING = "streaming"
DONE_STATUS = "done"
ERROR_STATUS = "error"
CANCELLED_STATUS = "cancelled"


@dataclass(slots=True)
class ChoiceState:
    choice: int
    content_parts: list[str] = field(default_factory=list)
    refusal_parts: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None

    @property
    def content(self) -> str:
        if len(self.content_parts) > 1:
            # Collapse once so repeated snapshots do not re-join thousands of pieces.
            self.content_parts[:] = ["".join(self.content_parts)]
        return self.content_parts[0] if self.content_parts else ""

    @property
    def refusal(self) -> str | None:
        return "".join(self.refusal_parts) if self.refusal_parts else None

    def merge_tool_calls(self, fragments: list[dict[str, Any]]) -> None:
        for position, fragment in enumerate(fragments):
            index = fragment.get("index", position)
            if not isinstance(index, int):
                index = position
            call = self.tool_calls.setdefault(
                index, {"index": index, "id": None, "type": None,
                        "function": {"name": "", "arguments": ""}}
            )
            for key in ("id", "type"):
                if isinstance(fragment.get(key), str):
                    call[key] = fragment[key]
            function = fragment.get("function")
            if isinstance(function, dict):
                for key in ("name", "arguments"):
                    piece = function.get(key)
                    if isinstance(piece, str):
                        call["function"][key] += piece

    def to_json(self) -> dict[str, Any]:
        return {
            "choice": self.choice,
            "content": self.content,
            "tool_calls": [self.tool_calls[i] for i in sorted(self.tool_calls)] or None,
            "refusal": self.refusal,
            "finish_reason": self.finish_reason,
        }


@dataclass(slots=True)
class TurnState:
    turn: int
    model: str | None = None
    status: str = STREAMING
    usage: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    choices: dict[int, ChoiceState] = field(default_factory=dict)

    def choice(self, index: int) -> ChoiceState:
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = ChoiceState(index)
        return state

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "turn": self.turn,
            "status": self.status,
            "model": self.model,
            "usage": self.usage,
            "choices": [self.choices[i].to_json() for i in sorted(self.choices)],
        }
        if self.error is not None:
            body["error"] = self.error
        return body


class Transcript:
    """Every turn of one conversation, as of the last applied event."""

    __slots__ = ("turns",)

    def __init__(self) -> None:
        self.turns: list[TurnState] = []

    @property
    def status(self) -> str:
        """The conversation's status: its latest turn's, or `streaming` before any."""
        return self.turns[-1].status if self.turns else STREAMING

    def apply(self, kind: str, payload: dict[str, Any]) -> None:
        """Fold one event into the state. Raises ValueError for an event out of order or
        a kind that is not a conversation event."""
        if kind not in LOG_EVENT_KINDS:
            raise ValueError(f"{kind!r} is not a log event kind")
        if kind == TURN:
            if payload["turn"] != len(self.turns):
                raise ValueError(f"turn {payload['turn']} started out of order")
            self.turns.append(TurnState(turn=payload["turn"], model=payload.get("model")))
            return
        turn = self._turn(payload["turn"])
        if kind == ANSWER:
            choice = turn.choice(payload["choice"])
            if payload.get("content"):
                choice.content_parts.append(payload["content"])
            if payload.get("refusal"):
                choice.refusal_parts.append(payload["refusal"])
            if payload.get("tool_calls"):
                choice.merge_tool_calls(payload["tool_calls"])
        elif kind in (DONE, ERROR):
            for ended in payload.get("choices", ()):
                turn.choice(ended["choice"]).finish_reason = ended["finish_reason"]
            turn.usage = payload.get("usage")
            if kind == DONE:
                turn.status = DONE_STATUS
            else:
                cancelled = payload["code"] == CANCELLED_STATUS
                turn.status = CANCELLED_STATUS if cancelled else ERROR_STATUS
                turn.error = {"code": payload["code"], "message": payload["message"]}
        else:
            raise ValueError(f"unknown event kind {kind!r}")

    def _turn(self, number: int) -> TurnState:
        if not 0 <= number < len(self.turns):
            raise ValueError(f"event for unknown turn {number}")
        return self.turns[number]

    def to_json(self) -> list[dict[str, Any]]:
        return [turn.to_json() for turn in self.turns]

    def snapshot(self) -> dict[str, Any]:
        """The fields of the log's `snapshot` besides `seq` (see `hub.LogState`)."""
        return {"turns": self.to_json()}
