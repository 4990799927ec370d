"""OpenAI Chat Completions stream chunks: decoded JSON in, typed values out.

Pure: no I/O. Knows the wire shape of `chat.completion.chunk` objects and nothing of
Chorus events. Every delta field is carried: role, content, refusal, tool_calls
fragments, finish_reason, per choice `index`; and the usage chunk (empty `choices`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .errors import TurnErrorCode, UpstreamFailure

_MAX_ERROR_MESSAGE = 500


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    index: int
    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None

    @property
    def has_payload(self) -> bool:
        """True when the delta carries text, a refusal or tool-call fragments."""
        return bool(self.content) or bool(self.refusal) or bool(self.tool_calls)


@dataclass(frozen=True, slots=True)
class ChatChunk:
    choices: tuple[ChoiceDelta, ...]
    usage: dict[str, Any] | None = None
    model: str | None = None


def _protocol(message: str) -> UpstreamFailure:
    return UpstreamFailure(TurnErrorCode.UPSTREAM_PROTOCOL, message)


def describe_upstream_error(error: object) -> str:
    """A short, printable description of an upstream `error` object."""
    if isinstance(error, dict):
        message = error.get("message")
        kind = error.get("type") or error.get("code")
        text = str(message) if message is not None else orjson.dumps(error).decode()
        if kind:
            text = f"{kind}: {text}"
    else:
        text = str(error)
    return text[:_MAX_ERROR_MESSAGE]


def _optional_str(value: object, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _protocol(f"{what} is not a string")


def _parse_choice(raw: object) -> ChoiceDelta:
    if not isinstance(raw, dict):
        raise _protocol("a choice is not an object")
    index = raw.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise _protocol("a choice has no valid index")
    delta = raw.get("delta") or {}
    if not isinstance(delta, dict):
        raise _protocol("a choice delta is not an object")
    tool_calls = delta.get("tool_calls")
    if tool_calls is not None and not (
        isinstance(tool_calls, list) and all(isinstance(call, dict) for call in tool_calls)
    ):
        raise _protocol("tool_calls is not a list of objects")
    return ChoiceDelta(
        index=index,
        role=_optional_str(delta.get("role"), "role"),
        content=_optional_str(delta.get("content"), "content"),
        refusal=_optional_str(delta.get("refusal"), "refusal"),
        tool_calls=tool_calls or None,
        finish_reason=_optional_str(raw.get("finish_reason"), "finish_reason"),
    )


def parse_chunk(data: str) -> ChatChunk:
    """Decode one SSE `data` payload into a ChatChunk.

    Raises UpstreamFailure: `upstream_protocol` for invalid JSON or a malformed chunk,
    `upstream_error` for an in-band `{"error": ...}` object.
    """
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _protocol("upstream sent a chunk that is not valid JSON") from None
    if not isinstance(decoded, dict):
        raise _protocol("upstream sent a chunk that is not a JSON object")
    if "error" in decoded and decoded["error"] is not None:
        raise UpstreamFailure(
            TurnErrorCode.UPSTREAM_ERROR, describe_upstream_error(decoded["error"])
        )
    choices = decoded.get("choices") or []
    if not isinstance(choices, list):
        raise _protocol("choices is not a list")
    usage = decoded.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise _protocol("usage is not an object")
    model = decoded.get("model")
    return ChatChunk(
        choices=tuple(_parse_choice(choice) for choice in choices),
        usage=usage,
        model=model if isinstance(model, str) else None,
    )
