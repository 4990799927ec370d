"""A scriptable OpenAI-compatible upstream: a real aiohttp server for the tests.

Each incoming `POST /v1/chat/completions` takes the next `Script` from a queue and plays
its steps on the socket: a status with a body, raw bytes, a wait on an `asyncio.Event`
the test controls, an abrupt close, or a hang until the client goes away. Every request
is recorded (body and headers) so tests can count upstream calls and check what was sent.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass(frozen=True)
class Respond:
    """Answer with a status and body and stop (an HTTP error, typically)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Send:
    """Write these bytes as one write (the stream's headers go out before the first)."""

    data: bytes


@dataclass(frozen=True)
class WaitFor:
    """Pause until the test sets this event."""

    event: asyncio.Event


@dataclass(frozen=True)
class Delay:
    """Pause for this many seconds: pacing, as a real model streams (not synchronization)."""

    seconds: float


@dataclass(frozen=True)
class Cut:
    """Drop the connection abruptly, mid-stream."""


@dataclass(frozen=True)
class Hang:
    """Never answer again; wait until the client goes away."""


Step = Respond | Send | WaitFor | Delay | Cut | Hang


@dataclass
class Script:
    steps: list[Step]
    content_type: str = "text/event-stream"


def chunk(
    *,
    content: str | None = None,
    index: int = 0,
    role: str | None = None,
    finish_reason: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    refusal: str | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk` object with a single choice."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    if refusal is not None:
        delta["refusal"] = refusal
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "test-model",
        "choices": [
            {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        ],
    }


def usage_chunk(prompt: int = 3, completion: int = 5) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "test-model",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def sse(obj: dict[str, Any] | str, *, newline: bytes = b"\n") -> bytes:
    """One SSE `data:` event carrying `obj` as JSON (or a raw string such as [DONE])."""
    data = obj.encode() if isinstance(obj, str) else orjson.dumps(obj)
    return b"data: " + data + newline + newline


DONE = sse("[DONE]")


def answer_script(
    pieces: list[str],
    *,
    usage: bool = True,
    finish_reason: str = "stop",
    pace: float = 0.0,
) -> Script:
    """A well-formed stream: a role chunk, one chunk per piece (each `pace` seconds apart
    when given), finish, usage, [DONE]."""
    steps: list[Step] = [Send(sse(chunk(role="assistant", content="")))]
    for piece in pieces:
        if pace:
            steps.append(Delay(pace))
        steps.append(Send(sse(chunk(content=piece))))
    steps.append(Send(sse(chunk(finish_reason=finish_reason))))
    if usage:
        steps.append(Send(sse(usage_chunk())))
    steps.append(Send(DONE))
    return Script(steps)


def gated_script(gate: asyncio.Event, pieces: list[str], *, after: int = 0) -> Script:
    """An answer that waits for `gate` after its role chunk and `after` pieces."""
    script = answer_script(pieces)
    script.steps.insert(1 + after, WaitFor(gate))
    return script


class FakeUpstream:
    """The scripted upstream's state: queued scripts and recorded requests."""

    def __init__(self) -> None:
        self.scripts: deque[Script] = deque()
        # Scripts chosen by the last message's content, for tests whose requests race.
        self.scripts_by_prompt: dict[str, Script] = {}
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.active = 0
        self.finished = asyncio.Event()
        self.url = ""
        self.server: Any = None  # the aiohttp TestServer, set by the fixture

    @property
    def open_connections(self) -> int:
        """Connections Chorus holds open to this upstream (its keep-alive pool included)."""
        return len(self.server.runner.server.connections) if self.server else 0

    def enqueue(self, *scripts: Script) -> None:
        self.scripts.extend(scripts)

    @property
    def calls(self) -> int:
        return len(self.requests)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        prompt = body.get("messages", [{}])[-1].get("content")
        if isinstance(prompt, str) and prompt in self.scripts_by_prompt:
            script = self.scripts_by_prompt.pop(prompt)
        elif self.scripts:
            script = self.scripts.popleft()
        else:
            return web.Response(status=500, text="fake upstream: no script queued")
        self.active += 1
        try:
            return await self._play(request, script)
        finally:
            self.active -= 1
            self.finished.set()

    async def _play(self, request: web.Request, script: Script) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        for step in script.steps:
            if isinstance(step, Respond):
                return web.Response(status=step.status, body=step.body, headers=step.headers)
            if isinstance(step, WaitFor):
                await step.event.wait()
            elif isinstance(step, Delay):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, Hang):
                await asyncio.Event().wait()
            elif isinstance(step, Cut):
                assert request.transport is not None
                request.transport.abort()
                return response or web.Response(status=500)
            elif isinstance(step, Send):
                if response is None:
                    response = web.StreamResponse(headers={"Content-Type": script.content_type})
                    await response.prepare(request)
                await response.write(step.data)
        if response is None:
            response = web.StreamResponse(headers={"Content-Type": script.content_type})
            await response.prepare(request)
        await response.write_eof()
        return response
