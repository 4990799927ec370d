"""Wiring: builds the `web.Application` and owns the lifecycles of what it holds.

The upstream `ClientSession` (one for the whole app), the embedded mock upstream when it
is in use, the hub and the conversation registry are created in a cleanup context and
torn down in reverse. On shutdown every stream is ended with `end` `shutdown`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from .app_keys import FRAMER, HUB, IDEMPOTENCY, LIMITS, REGISTRY, SETTINGS, UPSTREAM_INFO
from .app_keys import METRICS, READINESS
from .app_keys import FIREHOSE
from .firehose import STATS_SECONDS, Firehose
from .auth import caller_identity, setup_access_control
from .config import Settings
from .conversations import ConversationRegistry
from .transport_sink import ChunkFramer
from .hub import Hub, MemoryHub
from .idempotency import IdempotencyStore
from .limits import Limits
from .metrics import Metrics
from .readiness import Readiness
from .mock import MockSettings, build_mock_app
from .routes import add_routes
from .tasks import cancel_and_wait
from .upstream import UpstreamClient

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


async def _start_embedded_mock(settings: Settings) -> tuple[web.AppRunner, str]:
    """Serve the mock upstream on an ephemeral loopback port; return its runner and base URL."""
    mock_app = build_mock_app(
        MockSettings(
            chunks_per_second=settings.mock.chunks_per_second,
            model=settings.upstream.model,
            answer_repeat=settings.mock.answer_repeat,
        )
    )
    runner = web.AppRunner(mock_app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://{LOOPBACK}:{port}/v1"


async def _upstream_and_registry(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    upstream_settings = settings.upstream
    mock_runner: web.AppRunner | None = None
    if settings.use_mock:
        mock_runner, base_url = await _start_embedded_mock(settings)
        upstream_settings = dataclasses.replace(upstream_settings, base_url=base_url)
        logger.info(
            "upstream: embedded MOCK at %s (%g chunks/s) - no OPENAI_API_KEY or base_url set",
            base_url, settings.mock.chunks_per_second,
        )
    else:
        logger.info(
            "upstream: %s (default model %s, API key %s)",
            upstream_settings.base_url, upstream_settings.model,
            "from OPENAI_API_KEY" if upstream_settings.api_key else "not set",
        )
    app[UPSTREAM_INFO] = {"mock": settings.use_mock, "model": upstream_settings.model}
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
    )
    hub = MemoryHub(
        buffer_events=settings.hub.buffer_events, buffer_bytes=settings.hub.buffer_bytes
    )
    app[HUB] = hub
    app[REGISTRY] = ConversationRegistry(
        hub=hub, client=UpstreamClient(session, upstream_settings), settings=settings.hub,
        max_live_turns=settings.limits.max_live_conversations,
    )
    try:
        yield
    finally:
        await app[REGISTRY].close_all("shutdown")
        await session.close()
        if mock_runner is not None:
            await mock_runner.cleanup()


async def _beat(hub: Hub, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            hub.heartbeat()
        except Exception:
            # One failed round must not silence every stream's heartbeat for good.
            logger.exception("heartbeat round failed")


async def _heartbeat(app: web.Application) -> AsyncIterator[None]:
    """One task pings every subscriber every `hub.heartbeat_seconds` (not one per stream)."""
    task = asyncio.create_task(
        _beat(app[HUB], app[SETTINGS].hub.heartbeat_seconds), name="hub-heartbeat"
    )
    try:
        yield
    finally:
        await cancel_and_wait(task)


async def _metrics(app: web.Application) -> AsyncIterator[None]:
    """This app's metrics (its own Prometheus registry): read from the registry, the hub
    and the upstream client at scrape time, and told of every turn as an observer."""
    registry = app[REGISTRY]
    metrics = Metrics(conversations=registry, hub=app[HUB], client=registry.client)
    registry.observers.add(metrics.turns)
    app[METRICS] = metrics
    yield


async def _firehose(app: web.Application) -> AsyncIterator[None]:
    """The firehose's log, fed by the registry's observers, and its one stats task."""
    settings = app[SETTINGS].hub
    firehose = Firehose(
        registry=app[REGISTRY], hub=app[HUB],
        max_events=settings.buffer_events, max_bytes=settings.buffer_bytes,
    )
    app[REGISTRY].observers.add(firehose)
    app[FIREHOSE] = firehose
    task = asyncio.create_task(firehose.run_stats(STATS_SECONDS), name="firehose-stats")
    try:
        yield
    finally:
        await cancel_and_wait(task)
        firehose.close("shutdown")


async def _end_firehose_streams(app: web.Application) -> None:
    """After the graceful wait (so dashboards saw the conversations end): end every
    firehose stream with `end` "shutdown" and a retry hint."""
    if FIREHOSE in app:
        app[FIREHOSE].end_subscribers(retry_ms=app[SETTINGS].hub.retry_hint_ms)


async def _ready(app: web.Application) -> None:
    """on_startup runs after every cleanup context has started: from now on, ready."""
    app[READINESS].set_started()


async def _not_ready(app: web.Application) -> None:
    """The first shutdown hook: /readyz answers 503 while running turns get their grace."""
    app[READINESS].set_shutting_down()


async def _shut_down_gracefully(app: web.Application) -> None:
    """SIGTERM/SIGINT (aiohttp has stopped accepting by now): end every stream with `end`
    "shutdown" and a retry hint, let running turns finish within
    `server.shutdown_grace_seconds`, then cancel what is left."""
    if REGISTRY in app:
        settings = app[SETTINGS]
        await app[REGISTRY].shut_down(
            grace_seconds=settings.server.shutdown_grace_seconds,
            retry_hint_ms=settings.hub.retry_hint_ms,
        )


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app[SETTINGS] = settings
    app[FRAMER] = ChunkFramer()
    app[LIMITS] = Limits(settings.limits, identity=caller_identity)
    app[IDEMPOTENCY] = IdempotencyStore(
        window_seconds=settings.server.idempotency_window_seconds
    )
    setup_access_control(app)  # first: a bad keys file stops start-up before anything runs
    app.cleanup_ctx.append(_upstream_and_registry)
    app.cleanup_ctx.append(_heartbeat)
    app.cleanup_ctx.append(_metrics)
    app[READINESS] = Readiness()
    app.on_startup.append(_ready)
    app.on_shutdown.append(_not_ready)  # before the graceful wait below
    app.on_shutdown.append(_shut_down_gracefully)
    app.cleanup_ctx.append(_firehose)
    app.on_shutdown.append(_end_firehose_streams)
    add_routes(app)
    return app
