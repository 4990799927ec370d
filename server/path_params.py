"""Parameters taken from request paths, validated."""

from __future__ import annotations

import re

from aiohttp import web

from .errors import NotFound

CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def conversation_id_of(request: web.Request) -> str:
    """The `{conversation_id}` path segment; a malformed one is simply not found (404)."""
    value = request.match_info["conversation_id"]
    if not CONVERSATION_ID.fullmatch(value):
        raise NotFound("conversation not found", code="conversation_not_found")
    return value


def events_url(conversation_id: str) -> str:
    """The path of a conversation's SSE stream."""
    return f"/v1/conversations/{conversation_id}/events"
