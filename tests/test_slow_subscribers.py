"""Subscribers that read slowly or not at all, among many that read normally.

The normal ones must finish, the slow one must still get the whole answer (through a
snapshot once it falls out of the buffer), the stalled one must be dropped after
`hub.send_timeout`, and what the server holds for them must stay bounded.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import aiohttp
import pytest

from server.sse import SSEDecoder, ServerSentEvent

from .conftest import (
    EventStream,
    StartChorus,
    assembled_answer,
    eventually,
    small_receive_buffer_socket,
    turn_has_ended,
)
from .fake_upstream import FakeUpstream, WaitFor, answer_script




async def test_stalled_and_slow_subscribers_among_two_hundred(
    start_chorus: StartChorus,
    fake_upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="server.events_route")
    pieces = [f"[{i:04d}]" + "y" * 250 for i in range(1200)]  # ~300 KB of answer
    expected = "".join(pieces)
    gate = asyncio.Event()
    script = answer_script(pieces)
    script.steps.insert(1, WaitFor(gate))
    fake_upstream.enqueue(script)
    buffer_bytes = 64 * 1024
    chorus = await start_chorus(hub={"buffer_bytes": buffer_bytes, "send_timeout": 1.0})
    created = await chorus.create()
    log = chorus.registry.get(created["id"]).log
    url = chorus.server.make_url(created["events_url"])

    connector = aiohttp.TCPConnector(socket_factory=small_receive_buffer_socket)
    async with (
        aiohttp.ClientSession(connector=connector) as stalled_session,
        # No connection limit: the default of 100 would queue half the readers.
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        stalled = await stalled_session.get(url)
        # Shrink the server side's send buffer for this one connection too, so that what
        # the kernel cannot take queues in the server process, where it must stay bounded.
        assert stalled.connection is not None and stalled.connection.transport is not None
        client_port = stalled.connection.transport.get_extra_info("sockname")[1]
        server_side = next(
            handler.transport
            for handler in chorus.server.runner.server.connections  # type: ignore[union-attr]
            if handler.transport is not None
            and handler.transport.get_extra_info("peername")[1] == client_port
        )
        server_side.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        slow_response = await session.get(url)
        normal = [EventStream(await session.get(url)) for _ in range(200)]
        await eventually(lambda: log.subscriber_count == 202)

        async def read_slowly() -> list[ServerSentEvent]:
            decoder = SSEDecoder()
            events: list[ServerSentEvent] = []
            async with asyncio.timeout(60):
                while not any(turn_has_ended(e) for e in events):
                    data = await slow_response.content.read(1024)
                    assert data, "the slow subscriber's stream closed early"
                    events += decoder.feed(data)
                    await asyncio.sleep(0.002)  # this reader is slow on purpose
            return events

        largest_queue = 0

        async def watch_queues() -> None:
            nonlocal largest_queue
            while True:
                for handler in chorus.server.runner.server.connections:  # type: ignore[union-attr]
                    if handler.transport is not None:
                        largest_queue = max(
                            largest_queue, handler.transport.get_write_buffer_size()
                        )
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch_queues(), name="watch-queues")
        slow = asyncio.create_task(read_slowly(), name="slow-reader")
        started = time.perf_counter()
        gate.set()
        results = await asyncio.gather(*(stream.until_turn_ends() for stream in normal))
        normal_done = time.perf_counter() - started
        slow_events = await slow
        # The stalled one is dropped, by the send timeout on its backed-up writes (or, if
        # it fires first, by the kernel's TCP_USER_TIMEOUT, set to the same 1 s); everyone
        # else is still attached.
        await eventually(lambda: log.subscriber_count == 201)
        assert server_side.is_closing()
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher

        for events in results:
            assert assembled_answer(events) == expected
        assert "snapshot" in [e.event for e in slow_events]
        assert assembled_answer(slow_events) == expected
        # Bounded: at most one take (the buffer, or one snapshot) plus the drain limit.
        snapshot_size = len(log.snapshot_frame())
        assert 0 < largest_queue <= max(buffer_bytes, snapshot_size) + 64 * 1024
        print(
            f"\n200 readers done in {normal_done * 1000:.0f} ms; slow reader got "
            f"{len(slow_events)} events incl. a snapshot; largest send queue "
            f"{largest_queue} bytes (snapshot {snapshot_size} bytes)"
        )
        # What reaches the stalled client is a cut stream: never the whole answer.
        leftovers = EventStream(stalled)
        with pytest.raises((aiohttp.ClientError, ConnectionError)):
            await leftovers.until_closed()
            raise ConnectionError("stream ended cleanly")
        slow_response.close()
        for stream in normal:
            stream.close()
