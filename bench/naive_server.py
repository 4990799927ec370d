"""The naive baseline: the "typical aiohttp hub" that Chorus is benchmarked against.

    python bench/naive_server.py --port P --upstream-base-url http://127.0.0.1:8001/v1

The same API subset as Chorus, written the way a competent aiohttp + aiohttp-sse
developer would write it first:

- `POST /v1/conversations` -> 201 `{"id", "events_url", "status"}`; one upstream streaming
  request per conversation (one shared aiohttp `ClientSession`), its `data:` lines parsed
  with `json.loads`, each delta appended to the conversation's history and put on every
  subscriber's `asyncio.Queue`.
- `GET /v1/conversations/{id}/events`: `turn` / `answer` / `done` (or `error`) with the
  same JSON payloads and `id:` sequence numbers as Chorus; a late joiner is replayed the
  whole history (or what follows its `Last-Event-ID`) and then follows live. Registering
  the queue and slicing the history happen in one step, so there is no gap and no
  duplicate.
- Per event per subscriber: one `json.dumps` and one `await sse.send(...)`.

It is not sabotaged: no per-event logging, a connection pool without a limit (so 200
conversations stream at once), `handler_cancellation=True` as in Chorus (a subscriber
that leaves is detached at once), and the same event loop as Chorus (uvloop when it is
installed). What it lacks is what Chorus is for: encode-once frames, joined writes, and
bounded memory for slow subscribers (the queues here are unbounded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp_sse import EventSourceResponse

logger = logging.getLogger("naive")

Event = tuple[int, str, dict[str, Any]]


class Conversation:
    """One answer: its history (every event so far) and its subscribers' queues."""

    def __init__(self, conversation_id: str) -> None:
        self.id = conversation_id
        self.history: list[Event] = []
        self.subscribers: set[asyncio.Queue[Event]] = set()
        self.task: asyncio.Task[None] | None = None

    def publish(self, event: str, data: dict[str, Any]) -> None:
        item = (len(self.history) + 1, event, data)
        self.history.append(item)
        for queue in self.subscribers:
            queue.put_nowait(item)


CONVERSATIONS = web.AppKey("conversations", dict[str, Conversation])
SESSION = web.AppKey("session", aiohttp.ClientSession)
OPTIONS = web.AppKey("options", argparse.Namespace)


async def run_upstream(
    app: web.Application, conversation: Conversation, body: dict[str, Any]
) -> None:
    """Stream one answer from upstream into the conversation."""
    options = app[OPTIONS]
    model = body.get("model") or options.model
    payload = {**body, "model": model, "stream": True, "stream_options": {"include_usage": True}}
    conversation.publish("turn", {"turn": 0, "model": model})
    finish_reasons: dict[int, str | None] = {}
    usage: dict[str, Any] | None = None
    try:
        async with app[SESSION].post(
            f"{options.upstream_base_url}/chat/completions", json=payload
        ) as response:
            if response.status != 200:
                raise RuntimeError(f"upstream answered {response.status}")
            pending = b""
            async for data in response.content.iter_any():
                pending += data
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.rstrip(b"\r")
                    if not line.startswith(b"data:"):
                        continue
                    value = line[5:].strip()
                    if value == b"[DONE]":
                        continue
                    chunk = json.loads(value)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices", []):
                        index = choice["index"]
                        if choice.get("finish_reason") or index not in finish_reasons:
                            finish_reasons[index] = choice.get("finish_reason")
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            conversation.publish(
                                "answer", {"turn": 0, "choice": index, "content": content}
                            )
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # errors travel to the subscribers as an event
        logger.warning("conversation %s: %s", conversation.id, exc)
        conversation.publish("error", {"turn": 0, "code": "upstream_error", "message": str(exc)})
        return
    ended = [
        {"choice": index, "finish_reason": reason}
        for index, reason in sorted(finish_reasons.items())
    ]
    conversation.publish(
        "done",
        {
            "turn": 0,
            "finish_reason": ended[0]["finish_reason"] if ended else None,
            "usage": usage,
            "choices": ended,
        },
    )


async def create_conversation(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": {"code": "invalid_json"}}, status=400)
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return web.json_response({"error": {"code": "invalid_messages"}}, status=400)
    conversation = Conversation(secrets.token_urlsafe(18))
    request.app[CONVERSATIONS][conversation.id] = conversation
    conversation.task = asyncio.create_task(
        run_upstream(request.app, conversation, body), name=f"upstream:{conversation.id}"
    )
    return web.json_response(
        {
            "id": conversation.id,
            "events_url": f"/v1/conversations/{conversation.id}/events",
            "status": "streaming",
        },
        status=201,
    )


async def conversation_events(request: web.Request) -> web.StreamResponse:
    conversation = request.app[CONVERSATIONS].get(request.match_info["conversation_id"])
    if conversation is None:
        return web.json_response({"error": {"code": "conversation_not_found"}}, status=404)
    header = request.headers.get("Last-Event-ID", "0").strip() or "0"
    after = int(header) if header.isdigit() else 0
    queue: asyncio.Queue[Event] = asyncio.Queue()
    # No await between these two lines: nothing can be published in between.
    backlog = conversation.history[after:]
    conversation.subscribers.add(queue)
    sse = EventSourceResponse(ping_interval=request.app[OPTIONS].heartbeat_seconds)
    try:
        await sse.prepare(request)
        async with sse:
            for seq, event, data in backlog:
                await sse.send(encode(data), id=str(seq), event=event)
            while True:
                seq, event, data = await queue.get()
                await sse.send(encode(data), id=str(seq), event=event)
    except ConnectionResetError:
        pass  # the subscriber went away
    finally:
        conversation.subscribers.discard(queue)
    return sse


def encode(data: dict[str, Any]) -> str:
    """Compact JSON with raw UTF-8, the same text as Chorus's orjson output."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def client_session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
    )
    yield
    for conversation in app[CONVERSATIONS].values():
        if conversation.task is not None:
            conversation.task.cancel()
    for conversation in app[CONVERSATIONS].values():
        if conversation.task is not None:
            try:
                await conversation.task
            except asyncio.CancelledError:
                pass
    await app[SESSION].close()


def create_app(options: argparse.Namespace) -> web.Application:
    app = web.Application()
    app[OPTIONS] = options
    app[CONVERSATIONS] = {}
    app.cleanup_ctx.append(client_session)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/conversations", create_conversation)
    app.router.add_get("/v1/conversations/{conversation_id}/events", conversation_events)
    return app


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The same choice as Chorus's `python -m server`: uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def main() -> None:
    parser = argparse.ArgumentParser(description="Naive aiohttp SSE hub (benchmark baseline)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-base-url", required=True)
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--heartbeat-seconds", type=float, default=15.0)
    parser.add_argument("--log-level", default="WARNING")
    options = parser.parse_args()
    options.upstream_base_url = options.upstream_base_url.rstrip("/")
    logging.basicConfig(
        level=options.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    web.run_app(
        create_app(options),
        host=options.host,
        port=options.port,
        handler_cancellation=True,
        print=None,
        loop=new_event_loop(),
    )


if __name__ == "__main__":
    main()
