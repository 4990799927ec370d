"""Shared fixtures: a scripted fake upstream and a Chorus server, both on real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.app_keys import REGISTRY
from server.config import (
    AuthSettings,
    HubSettings,
    LimitsSettings,
    ServerSettings,
    Settings,
    UpstreamSettings,
)
from server.conversations import ConversationRegistry
from server.sse import ServerSentEvent, SSEDecoder

from .fake_upstream import FakeUpstream

STEP_TIMEOUT = 10.0


def make_settings(upstream_url: str, **sections: dict[str, Any]) -> Settings:
    """Test settings: fast retries, no heartbeats in the way; `sections` override keys."""
    server = ServerSettings(host="127.0.0.1", port=0)
    upstream = UpstreamSettings(
        base_url=upstream_url,
        model="test-model",
        connect_timeout=2.0,
        first_chunk_timeout=5.0,
        idle_timeout=5.0,
        max_retries=2,
        retry_backoff_seconds=0.01,
        retry_backoff_max_seconds=0.05,
        api_key="sk-test-SECRET-key-0123456789",
    )
    hub = HubSettings(heartbeat_seconds=60.0, retention_seconds=60.0)
    # Every test client is 127.0.0.1: no start-rate limit unless a test asks for one.
    limits = LimitsSettings(starts_per_minute_per_key=0)
    return Settings(
        server=dataclasses.replace(server, **sections.get("server", {})),
        upstream=dataclasses.replace(upstream, **sections.get("upstream", {})),
        hub=dataclasses.replace(hub, **sections.get("hub", {})),
        limits=dataclasses.replace(limits, **sections.get("limits", {})),
        auth=dataclasses.replace(AuthSettings(), **sections.get("auth", {})),
        use_mock=False,
    )


async def eventually(predicate: Callable[[], bool], *, timeout: float = STEP_TIMEOUT) -> None:
    """Wait until `predicate()` holds, checking every few milliseconds; fail after `timeout`."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


class EventStream:
    """One SSE subscriber: the raw bytes it received and the events decoded from them."""

    def __init__(self, response: Any) -> None:
        self.response = response
        self.status = response.status
        self.raw = bytearray()
        self.events: list[ServerSentEvent] = []
        self._decoder = SSEDecoder()
        self._read = 0
        self.eof = False

    async def next_event(self) -> ServerSentEvent:
        async with asyncio.timeout(STEP_TIMEOUT):
            while self._read >= len(self.events):
                data = await self.response.content.readany()
                if not data:
                    self.eof = True
                    raise EOFError("stream closed")
                self.raw += data
                self.events.extend(self._decoder.feed(data))
        event = self.events[self._read]
        self._read += 1
        return event

    async def until(self, predicate: Callable[[ServerSentEvent], bool]) -> list[ServerSentEvent]:
        """Read until an event matches; return every event read so far (all of them)."""
        while True:
            event = await self.next_event()
            if predicate(event):
                return self.events[: self._read]

    async def until_turn_ends(self, turn: int = 0) -> list[ServerSentEvent]:
        """Read until turn `turn` has ended: its `done` or `error` event, or a `snapshot`
        (sent to a subscriber that fell behind) in which that turn is no longer streaming."""
        return await self.until(lambda e: turn_has_ended(e, turn))

    async def until_closed(self) -> list[ServerSentEvent]:
        try:
            while True:
                await self.next_event()
        except EOFError:
            return self.events

    def close(self) -> None:
        self.response.close()


def turn_has_ended(event: ServerSentEvent, turn: int = 0) -> bool:
    if event.event in ("done", "error"):
        return bool(orjson.loads(event.data)["turn"] == turn)
    if event.event == "snapshot":
        turns = orjson.loads(event.data)["turns"]
        return len(turns) > turn and turns[turn]["status"] != "streaming"
    return False


def payloads(events: list[ServerSentEvent], kind: str) -> list[dict[str, Any]]:
    return [orjson.loads(e.data) for e in events if e.event == kind]


def answer_text(events: list[ServerSentEvent], *, turn: int = 0, choice: int = 0) -> str:
    return "".join(
        p["content"]
        for p in payloads(events, "answer")
        if p["turn"] == turn and p["choice"] == choice
    )


@dataclasses.dataclass
class Chorus:
    """A running Chorus server with a client, plus shortcuts for the API."""

    app: web.Application
    server: TestServer
    client: TestClient[web.Request, web.Application]

    @property
    def registry(self) -> ConversationRegistry:
        return self.app[REGISTRY]

    async def create(self, **body: Any) -> dict[str, Any]:
        body.setdefault("messages", [{"role": "user", "content": "hello"}])
        response = await self.client.post("/v1/conversations", json=body)
        assert response.status == 201, await response.text()
        result: dict[str, Any] = await response.json()
        return result

    async def subscribe(
        self,
        conversation_id: str,
        *,
        headers: dict[str, str] | None = None,
        query: str = "",
    ) -> EventStream:
        response = await self.client.get(
            f"/v1/conversations/{conversation_id}/events{query}", headers=headers
        )
        return EventStream(response)

    async def state(self, conversation_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/conversations/{conversation_id}")
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result


@pytest.fixture(autouse=True)
def _no_credentials_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chorus reads API keys and the token secret from the environment at start-up: a
    developer's own CHORUS_API_KEYS must not lock every test out. Tests set them."""
    monkeypatch.delenv("CHORUS_API_KEYS", raising=False)
    monkeypatch.delenv("CHORUS_TOKEN_SECRET", raising=False)


@pytest.fixture
async def fake_upstream(aiohttp_server: Any) -> FakeUpstream:
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("/v1"))
    fake.server = server
    return fake


StartChorus = Callable[..., Awaitable[Chorus]]


@pytest.fixture
def start_chorus(aiohttp_server: Any, aiohttp_client: Any, fake_upstream: FakeUpstream) -> StartChorus:
    """Start Chorus against the fake upstream; keyword args override settings sections."""

    async def start(**sections: dict[str, Any]) -> Chorus:
        app = create_app(make_settings(fake_upstream.url, **sections))
        server = await aiohttp_server(app)  # TestServer runs with handler_cancellation=True, as production does
        client = await aiohttp_client(server)
        return Chorus(app=app, server=server, client=client)

    return start


def upstream_tasks() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if task.get_name().startswith("upstream:") and not task.done()
    ]


# Modules whose tests run on both event loops Chorus supports: the ones that exercise
# writing straight into transports, where asyncio's and uvloop's transports differ.
_BOTH_LOOPS_MODULES = {"test_fanout", "test_batching"}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    if module in _BOTH_LOOPS_MODULES:
        import uvloop

        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


class FakeClock:
    """A clock for code that takes one (`clock=`): tests move `now` by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def assembled_answer(events: list[ServerSentEvent], *, turn: int = 0) -> str:
    """The answer a viewer shows for `turn`: a snapshot replaces what came before it."""
    text = ""
    for event in events:
        if event.event == "snapshot":
            turns = orjson.loads(event.data)["turns"]
            choices = turns[turn]["choices"] if len(turns) > turn else []
            text = choices[0]["content"] if choices else ""
        elif event.event == "answer":
            payload = orjson.loads(event.data)
            if payload["turn"] == turn and payload["choice"] == 0:
                text += payload["content"]
    return text


def small_receive_buffer_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """A client socket with a tiny receive window (for aiohttp's `socket_factory`), so a
    client that stops reading stalls the server within kilobytes, not megabytes."""
    family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def expect_json_error(
    response: Any, status: int, code: str, message: str, retry_after: str | None = None
) -> None:
    """The response is exactly this JSON error, with this Retry-After (or none)."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json", text
    assert orjson.loads(text) == {"error": {"code": code, "message": message}}
    assert response.headers.get("Retry-After") == retry_after


def caller_header(request: web.Request) -> str:
    """A caller identity taken from `X-Caller`, for tests of per-caller limits."""
    return request.headers.get("X-Caller", "anonymous")


async def start_chorus_with(
    aiohttp_server: Any, aiohttp_client: Any, fake_upstream: FakeUpstream, **replace: Any
) -> Chorus:
    """Chorus with some of its app state replaced before start-up, e.g. `LIMITS=...` to
    inject a clock or a caller identity (keys are names of `server.app_keys`)."""
    from server import app_keys

    app = create_app(make_settings(fake_upstream.url))
    for name, value in replace.items():
        app[getattr(app_keys, name)] = value
    server = await aiohttp_server(app)
    client = await aiohttp_client(server)
    return Chorus(app=app, server=server, client=client)


async def wait_until_serving(url: str, *, alive: Callable[[], bool] = lambda: True,
                             timeout: float = 15.0) -> None:
    """Poll `url` until it answers 200 (a server process starting up), failing at once if
    `alive()` turns false (the process died) and after `timeout`."""
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(timeout):
            while True:
                assert alive(), f"the server exited before {url} answered"
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
