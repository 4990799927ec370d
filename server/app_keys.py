"""Typed keys for the state Chorus keeps on its `web.Application` (no module globals)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .config import Settings
from .conversations import ConversationRegistry
from .transport_sink import ChunkFramer
from .hub import Hub

SETTINGS = web.AppKey("settings", Settings)
HUB = web.AppKey("hub", Hub)
REGISTRY = web.AppKey("registry", ConversationRegistry)
# Shared by every subscriber's sink: frames each pushed batch as an HTTP chunk once.
FRAMER = web.AppKey("framer", ChunkFramer)
# What /v1/info and the page say about the upstream: mock or not, default model.
UPSTREAM_INFO = web.AppKey("upstream_info", dict[str, Any])
