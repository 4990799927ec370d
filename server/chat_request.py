"""Validation of client request bodies, before anything is started.

Pure: decoded JSON in, validated values out, `InvalidRequest` for anything malformed,
with a message that says which field and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest, PayloadTooLarge

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Set by the server on every upstream request; a client's values are ignored.
_SERVER_OWNED = frozenset({"stream", "stream_options", "messages", "model"})


@dataclass(frozen=True, slots=True)
class ChatStart:
    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]

    @property
    def choices(self) -> int:
        n = self.params.get("n", 1)
        return n if isinstance(n, int) else 1


def _check_message(position: int, message: object) -> dict[str, Any]:
    where = f"messages[{position}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object", code="invalid_messages")
    role = message.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidRequest(
            f"{where}.role must be one of {', '.join(sorted(_ROLES))}", code="invalid_messages"
        )
    content = message.get("content")
    if content is None:
        if role != "assistant":
            raise InvalidRequest(f"{where}.content is required", code="invalid_messages")
    elif not isinstance(content, (str, list)):
        raise InvalidRequest(
            f"{where}.content must be a string or a list of content parts",
            code="invalid_messages",
        )
    return message


def parse_chat_start(
    body: object, *, default_model: str, max_choices: int, max_messages: int = 0
) -> ChatStart:
    """Validate a `POST /v1/conversations` body (an OpenAI chat request).

    More than `max_messages` messages (0 = no bound) is `PayloadTooLarge`
    (`too_many_messages`), checked before any message is looked at.
    """
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_body")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", code="invalid_messages")
    if max_messages and len(messages) > max_messages:
        raise PayloadTooLarge(
            f"messages has {len(messages)} entries; at most {max_messages} are accepted",
            code="too_many_messages",
        )
    checked = [_check_message(i, message) for i, message in enumerate(messages)]
    model = body.get("model", default_model)
    if model is None:
        model = default_model
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model must be a non-empty string", code="invalid_model")
    n = body.get("n", 1)
    if n is not None and (
        not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_choices
    ):
        raise InvalidRequest(f"n must be an integer from 1 to {max_choices}", code="invalid_n")
    params = {key: value for key, value in body.items() if key not in _SERVER_OWNED}
    return ChatStart(model=model, messages=checked, params=params)


def parse_follow_up(body: object) -> str:
    """Validate a `POST /v1/conversations/{id}/messages` body; return the user content."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", code="invalid_body")
    content = body.get("content")
    if not isinstance(content, str) or not content:
        raise InvalidRequest("content must be a non-empty string", code="invalid_content")
    return content
