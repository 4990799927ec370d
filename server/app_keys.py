"""Typed keys for the state Chorus keeps on its `web.Application` (no module globals)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .config import Settings
from .conversations import ConversationRegistry
from .credentials import AccessControl
from .transport_sink import ChunkFramer
from .hub import Hub
from .idempotency import IdempotencyStore
from .limits import Limits
from .firehose import Firehose
from .metrics import Metrics
from .readiness import Readiness

SETTINGS = web.AppKey("settings", Settings)
HUB = web.AppKey("hub", Hub)
REGISTRY = web.AppKey("registry", ConversationRegistry)
# Shared by every subscriber's sink: frames each pushed batch as an HTTP chunk once.
FRAMER = web.AppKey("framer", ChunkFramer)
# What /v1/info and the page say about the upstream: mock or not, default model.
UPSTREAM_INFO = web.AppKey("upstream_info", dict[str, Any])
# The [limits] checks (start rate per caller, subscriber bounds) and who the caller is.
LIMITS = web.AppKey("limits", Limits)
# Answers remembered per Idempotency-Key.
IDEMPOTENCY = web.AppKey("idempotency", IdempotencyStore)
# API keys, the watch-token signer and the CORS allowlist; set at start-up (server/auth.py).
ACCESS = web.AppKey("access", AccessControl)
# This app's own Prometheus registry, collectors and turn observer (GET /metrics).
METRICS = web.AppKey("metrics", Metrics)
# Starting / ready / shutting down (GET /readyz).
READINESS = web.AppKey("readiness", Readiness)
# The firehose: every conversation's lifecycle and stats as one log (GET /v1/events?all=1).
FIREHOSE = web.AppKey("firehose", Firehose)
