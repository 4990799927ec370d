"""The aiohttp floor: the thinnest aiohttp SSE endpoint that holds a subscriber.

    python bench/floor_server.py --port P

Run in scenario (d) only, next to Chorus and the naive hub, so the table shows what
aiohttp itself costs per idle connection on this Python: its protocol, request, response
and handler task, and the one future the handler waits on. Nothing else:

- `POST /v1/conversations` -> 201 with a fixed id and its `events_url` (the body is not
  read; there is no upstream, no hub, no conversation).
- `GET /v1/conversations/{id}/events` -> a plain `web.StreamResponse` with the same SSE
  headers as Chorus, chunked; `prepare()`, one write of `retry: 1000` and one `turn`
  event with `id: 1` (the client counts a subscriber once it has had its first event),
  then it awaits a future that never completes.

No middleware, no cursor, no heartbeat, no `/healthz` (readiness is a TCP connect). Like
the other two servers it runs with `handler_cancellation=True` (a subscriber that leaves
is cancelled, not leaked) and on the same event loop (uvloop when it is installed).
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

CONVERSATION_ID = "floor"
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
FIRST_WRITE = b'retry: 1000\n\nid: 1\nevent: turn\ndata: {"turn":0,"model":"floor"}\n\n'


async def create_conversation(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "id": CONVERSATION_ID,
            "events_url": f"/v1/conversations/{CONVERSATION_ID}/events",
            "status": "streaming",
        },
        status=201,
    )


async def conversation_events(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(FIRST_WRITE)
    await asyncio.get_running_loop().create_future()  # held until the client goes away
    return response


def create_app() -> web.Application:
    app = web.Application()
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
    parser = argparse.ArgumentParser(description="The thinnest aiohttp SSE endpoint (bench floor)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    options = parser.parse_args()
    web.run_app(
        create_app(),
        host=options.host,
        port=options.port,
        handler_cancellation=True,
        print=None,
        loop=new_event_loop(),
    )


if __name__ == "__main__":
    main()
