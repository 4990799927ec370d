"""The process-wide subscriber count that `limits.max_subscribers_total` bounds."""

from __future__ import annotations

from aiohttp import web

from .app_keys import FIREHOSE, HUB


def total_subscribers(app: web.Application) -> int:
    """Conversation streams (the hub's cursors, combined streams included) plus firehose
    streams, which the firehose counts on a tally of its own so metrics are not inflated."""
    total = app[HUB].subscriber_count
    if FIREHOSE in app:
        total += app[FIREHOSE].log.subscriber_count
    return total
