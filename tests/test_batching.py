"""The batched push path delivers exactly what a one-event-at-a-time reader would get.

The reference is the log itself: with a buffer big enough to keep everything, the bytes a
subscriber should receive from position p are the frames p+1..last, one event at a time,
concatenated. The push path batches (one write per flush, a joined write after a backed-up
connection drains, shared bytes per position); these tests check that batching never
reorders, drops, duplicates or alters a byte, including for subscribers that join while
events are being published and for those that fall out of the buffer (snapshot).
"""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from server.hub import MemoryCursor, MemoryEventLog
from server.sse import SSEDecoder

from .conftest import StartChorus, answer_text, eventually
from .fake_upstream import (
    DONE,
    FakeUpstream,
    Script,
    Send,
    Step,
    WaitFor,
    chunk,
    sse,
    usage_chunk,
)


class RecordingSink:
    """An in-memory sink that refuses more after `capacity` sends until drained."""

    def __init__(self, capacity: int | None) -> None:
        self.received = bytearray()
        self.sends = 0
        self._capacity = capacity
        self._since_drain = 0

    def send(self, data: bytes) -> bool:
        self.received += data
        self.sends += 1
        self._since_drain += 1
        return self._capacity is None or self._since_drain < self._capacity

    def drain(self) -> None:
        self._since_drain = 0


def _frame_of(log: MemoryEventLog, seq: int) -> bytes:
    """Event `seq` alone, as the log encoded it."""
    whole = log.frames_after(seq - 1)
    return whole[: len(whole) - len(log.frames_after(seq))]


def one_at_a_time(log: MemoryEventLog, after: int) -> bytes:
    """The reference: every event after `after`, each taken on its own, concatenated."""
    return b"".join(_frame_of(log, seq) for seq in range(after + 1, log.last_seq + 1))


def _publish_answer(log: MemoryEventLog, rng: random.Random, pieces: int) -> None:
    log.publish("turn", {"turn": 0, "model": "m"})
    for i in range(pieces):
        text = "".join(rng.choice("ab \"\\\n日🎵") for _ in range(rng.randint(1, 12)))
        log.publish("answer", {"turn": 0, "choice": 0, "content": f"{i}:{text}"})


@pytest.mark.parametrize("seed", range(12))
async def test_batched_delivery_matches_one_event_at_a_time(seed: int) -> None:
    rng = random.Random(seed)
    log = MemoryEventLog(max_events=10_000, max_bytes=10_000_000)
    subscribers: list[tuple[int, MemoryCursor, RecordingSink]] = []
    log.publish("turn", {"turn": 0, "model": "m"})
    for i in range(400):
        log.publish("answer", {"turn": 0, "choice": 0, "content": f"piece {i} “{rng.random()}”"})
        if rng.random() < 0.3:
            log.flush()
        if rng.random() < 0.05:
            # Join mid-stream, from the start or from a random point.
            after = rng.choice([0, rng.randint(0, log.last_seq)])
            cursor = log.subscribe(after=after)
            sink = RecordingSink(capacity=rng.choice([None, 1, 3, 10]))
            cursor.push_to(sink)
            subscribers.append((after, cursor, sink))
        for _, cursor, sink in subscribers:
            if cursor.backed_up and rng.random() < 0.5:
                sink.drain()
                cursor.resume()
    log.flush()
    for _, cursor, sink in subscribers:
        while cursor.backed_up:
            sink.drain()
            cursor.resume()

    assert subscribers
    for after, cursor, sink in subscribers:
        assert bytes(sink.received) == one_at_a_time(log, after)
        assert cursor.position == log.last_seq


async def test_subscribers_at_one_position_share_one_joined_write() -> None:
    log = MemoryEventLog(max_events=100, max_bytes=100_000)
    sinks = [RecordingSink(capacity=None) for _ in range(5)]
    for sink in sinks:
        log.subscribe(after=0).push_to(sink)
    for i in range(7):
        log.publish("turn" if i == 0 else "answer",
                    {"turn": 0, "model": "m"} if i == 0 else
                    {"turn": 0, "choice": 0, "content": str(i)})
    log.flush()
    # Seven events, one batch: each subscriber got one write, the same bytes object.
    assert [sink.sends for sink in sinks] == [1] * 5
    assert len({bytes(sink.received) for sink in sinks}) == 1
    assert bytes(sinks[0].received) == one_at_a_time(log, 0)


async def test_a_backed_up_subscriber_that_falls_out_of_the_buffer_gets_a_snapshot() -> None:
    log = MemoryEventLog(max_events=8, max_bytes=1_000_000)
    fast = RecordingSink(capacity=None)
    slow = RecordingSink(capacity=1)
    log.subscribe(after=0).push_to(fast)
    slow_cursor = log.subscribe(after=0)
    slow_cursor.push_to(slow)
    _publish_answer(log, random.Random(7), 3)
    log.flush()  # slow takes this batch, then reports backed up
    assert slow_cursor.backed_up
    before_gap = slow_cursor.position
    rng = random.Random(8)
    for i in range(30):
        log.publish("answer", {"turn": 0, "choice": 0, "content": f"later {i} {rng.random()}"})
        log.flush()
    assert log.first_buffered_seq > before_gap + 1
    slow.drain()
    slow_cursor.resume()

    decoder = SSEDecoder()
    events = decoder.feed(bytes(slow.received))
    kinds = [e.event for e in events]
    assert kinds[-1] == "snapshot"
    snapshot = orjson.loads(events[-1].data)
    assert snapshot["seq"] == log.last_seq
    assert int(events[-1].id or 0) == log.last_seq
    fast_text = answer_text(SSEDecoder().feed(bytes(fast.received)))
    assert snapshot["turns"][0]["choices"][0]["content"] == fast_text
    # Then on from the snapshot's seq: the next event, and nothing else.
    received = len(slow.received)
    log.publish("answer", {"turn": 0, "choice": 0, "content": "after"})
    log.flush()
    if slow_cursor.backed_up:  # capacity 1: the snapshot write backed it up again
        slow.drain()
        slow_cursor.resume()
    assert bytes(slow.received[received:]) == _frame_of(log, log.last_seq)


async def test_end_to_end_batches_are_byte_identical_to_the_log(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    """Upstream sends bursts of several chunks per write; subscribers join mid-stream and
    one reads slowly; every one of them gets exactly the log's frames, in order."""
    rng = random.Random(42)
    pieces = [f"«{i}» " + "x" * rng.randint(0, 300) for i in range(600)]
    frames = [sse(chunk(role="assistant", content=""))]
    frames += [sse(chunk(content=p)) for p in pieces]
    frames += [sse(chunk(finish_reason="stop")), sse(usage_chunk()), DONE]
    steps: list[Step] = []
    position = 0
    # (gate, how many events the log holds when the upstream reaches it)
    join_points: list[tuple[asyncio.Event, int]] = []
    while position < len(frames):
        burst = rng.randint(1, 25)
        steps.append(Send(b"".join(frames[position:position + burst])))
        position += burst
        if rng.random() < 0.15 and position <= len(pieces):
            gate = asyncio.Event()
            # The turn event, then one answer per piece sent (the role chunk makes none).
            join_points.append((gate, 1 + position - 1))
            steps.append(WaitFor(gate))
    fake_upstream.enqueue(Script(steps))
    chorus = await start_chorus(hub={"buffer_events": 100_000, "buffer_bytes": 100_000_000})
    created = await chorus.create()
    log = chorus.registry.get(created["id"]).log

    async def slow_reader() -> bytes:
        response = await chorus.client.get(created["events_url"])
        body = bytearray()
        decoder = SSEDecoder()
        async with asyncio.timeout(30):
            while True:
                data = await response.content.read(512)
                assert data, "stream closed early"
                body += data
                if any(e.event == "done" for e in decoder.feed(data)):
                    break
                await asyncio.sleep(0)  # yield: let the server run ahead of this reader
        response.close()
        return bytes(body)

    streams = [await chorus.subscribe(created["id"])]
    slow = asyncio.create_task(slow_reader(), name="slow-reader")
    for gate, published in join_points:
        await eventually(lambda: log.last_seq == published)  # noqa: B023 (awaited here)
        streams.append(await chorus.subscribe(created["id"]))
        gate.set()
    results = [await s.until_turn_ends() for s in streams]
    slow_body = await slow

    reference = b"retry: 2000\n\n" + log.frames_after(0)
    for stream, events in zip(streams, results, strict=True):
        assert bytes(stream.raw) == reference
        assert answer_text(events) == "".join(pieces)
    assert slow_body == reference
