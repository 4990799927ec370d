"""Fan-out: one upstream stream, many subscribers, identical bytes, replay and resume."""

from __future__ import annotations

import asyncio
import gc
import os
import time

import aiohttp
import orjson

from server.hub import MemoryCursor

from .conftest import (
    EventStream,
    StartChorus,
    answer_text,
    eventually,
    payloads,
    small_receive_buffer_socket,
    upstream_tasks,
)
from .fake_upstream import FakeUpstream, WaitFor, answer_script

# Quotes, backslashes, newlines, emoji (a surrogate pair in UTF-16) and CJK, split
# across chunks in awkward places.
TRICKY_PIECES = [
    'He said "hi', '" \\ back', 'slash\\n not a newline\n', 'real newline\r\nCRLF ',
    "emoji 🎵", "🧑‍🤝‍🧑 zwj ", "日本", "語の", "テキスト ", "tab\there ", "\u2028sep\u2029 ",
    "end.",
]


async def test_fifty_subscribers_receive_identical_bytes(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    script = answer_script(TRICKY_PIECES)
    script.steps.insert(1, WaitFor(gate))
    fake_upstream.enqueue(script)
    chorus = await start_chorus()
    created = await chorus.create()
    subscribers = [await chorus.subscribe(created["id"]) for _ in range(50)]
    await eventually(lambda: chorus.registry.get(created["id"]).log.subscriber_count == 50)
    gate.set()
    results = await asyncio.gather(*(s.until_turn_ends() for s in subscribers))

    expected = "".join(TRICKY_PIECES)
    first_raw = bytes(subscribers[0].raw)
    for subscriber, events in zip(subscribers, results, strict=True):
        assert bytes(subscriber.raw) == first_raw
        assert answer_text(events) == expected
        assert [e.event for e in events][0] == "turn"
        assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert fake_upstream.calls == 1
    done = payloads(results[0], "done")[0]
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    await eventually(lambda: not upstream_tasks())


def _event_ids(events: list) -> list[int]:
    return [int(e.id) for e in events if e.event != "end"]


async def test_late_joiner_gets_the_whole_answer_byte_for_byte(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(TRICKY_PIECES))
    chorus = await start_chorus()
    created = await chorus.create()
    live = await chorus.subscribe(created["id"])
    await live.until_turn_ends()

    late = await chorus.subscribe(created["id"])
    events = await late.until_turn_ends()
    assert bytes(late.raw) == bytes(live.raw)
    assert answer_text(events) == "".join(TRICKY_PIECES)
    assert fake_upstream.calls == 1


async def test_resume_from_every_point_has_no_gap_and_no_duplicate(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    first_half, second_half = TRICKY_PIECES[:6], TRICKY_PIECES[6:]
    gate = asyncio.Event()
    script = answer_script(first_half + second_half)
    script.steps.insert(1 + len(first_half), WaitFor(gate))
    fake_upstream.enqueue(script)
    chorus = await start_chorus()
    created = await chorus.create()
    log = chorus.registry.get(created["id"]).log
    reference = await chorus.subscribe(created["id"])
    # turn + the first half's answers are published, then the upstream waits.
    await reference.until(lambda e: e.id == str(1 + len(first_half)))
    paused_at = log.last_seq
    assert paused_at == 1 + len(first_half)

    resumed = {
        n: await chorus.subscribe(created["id"], headers={"Last-Event-ID": str(n)})
        for n in range(paused_at + 1)
    }
    await eventually(lambda: log.subscriber_count == len(resumed) + 1)
    gate.set()
    full = await reference.until_turn_ends()
    full_raw = bytes(reference.raw)
    for n, stream in resumed.items():
        events = await stream.until_turn_ends()
        assert _event_ids(events) == list(range(n + 1, log.last_seq + 1))
        # Same bytes as the reference from event n+1 on: find where it starts.
        assert full_raw.endswith(bytes(stream.raw).split(b"\n\n", 1)[1])
        assert answer_text(events) == "".join(TRICKY_PIECES[max(0, n - 1):])
    assert answer_text(full) == "".join(TRICKY_PIECES)


async def test_resume_point_out_of_the_buffer_gets_a_snapshot_then_live_events(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    pieces = [f"piece {i} “ç” \\ " for i in range(12)]
    gate = asyncio.Event()
    script = answer_script(pieces)
    script.steps.insert(1 + 10, WaitFor(gate))
    fake_upstream.enqueue(script)
    chorus = await start_chorus(hub={"buffer_events": 4})
    created = await chorus.create()
    log = chorus.registry.get(created["id"]).log
    await eventually(lambda: log.last_seq == 11)
    assert log.first_buffered_seq == 8

    behind = await chorus.subscribe(created["id"], headers={"Last-Event-ID": "3"})
    from_start = await chorus.subscribe(created["id"])
    still_buffered = await chorus.subscribe(created["id"], headers={"Last-Event-ID": "7"})
    for stream in (behind, from_start):
        snapshot_event = await stream.next_event()
        assert snapshot_event.event == "snapshot"
        assert snapshot_event.id == "11"
        snapshot = orjson.loads(snapshot_event.data)
        assert snapshot["seq"] == 11
        (turn,) = snapshot["turns"]
        assert turn["status"] == "streaming"
        assert turn["choices"][0]["content"] == "".join(pieces[:10])
    await eventually(lambda: log.subscriber_count == 3)
    gate.set()
    for stream in (behind, from_start):
        events = await stream.until_turn_ends()
        assert _event_ids(events) == [11] + list(range(12, log.last_seq + 1))
        snapshot = orjson.loads(events[0].data)
        assert snapshot["turns"][0]["choices"][0]["content"] + answer_text(events) == "".join(pieces)
    events = await still_buffered.until_turn_ends()
    assert [e.event for e in events][:1] == ["answer"]
    assert _event_ids(events) == list(range(8, log.last_seq + 1))




async def test_a_subscriber_that_stops_reading_does_not_delay_the_others(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    pieces = [f"{i:05d}" + "x" * 995 for i in range(3000)]  # ~3 MB of answer
    gate = asyncio.Event()
    script = answer_script(pieces)
    script.steps.insert(1, WaitFor(gate))
    fake_upstream.enqueue(script)
    # The buffer holds the whole answer: the readers never need a snapshot, so all they
    # can be delayed by is the stalled subscriber, which is what is being measured.
    buffer_bytes = 8 * 1024 * 1024
    chorus = await start_chorus(hub={"buffer_bytes": buffer_bytes})
    created = await chorus.create()
    log = chorus.registry.get(created["id"]).log

    connector = aiohttp.TCPConnector(socket_factory=small_receive_buffer_socket)
    async with aiohttp.ClientSession(connector=connector) as stalled_session:
        stalled = await stalled_session.get(
            chorus.server.make_url(f"/v1/conversations/{created['id']}/events")
        )
        assert stalled.status == 200
        readers = [await chorus.subscribe(created["id"]) for _ in range(5)]
        await eventually(lambda: log.subscriber_count == 6)
        started = time.perf_counter()
        gate.set()
        results = await asyncio.gather(*(r.until_turn_ends() for r in readers))
        elapsed = time.perf_counter() - started

        expected = "".join(pieces)
        for events in results:
            assert answer_text(events) == expected
        # The measure: when every reader is done, the stalled subscriber's socket is
        # blocked (the kernel's buffers are full, so asyncio queues in user space) and
        # the answer has not all reached it: it was stalled the whole time, and the
        # readers finished anyway.
        queues = sorted(
            handler.transport.get_write_buffer_size()
            for handler in chorus.server.runner.server.connections
            if handler.transport is not None
        )
        stalled_queue = queues[-1]
        assert queues[-2] == 0  # every reader has been sent everything
        assert stalled_queue > 0
        # Its memory is bounded: what is queued for it in user space is at most one
        # take (at most the buffer's bytes) plus aiohttp's drain limit.
        assert stalled_queue <= log.buffered_bytes + 64 * 1024
        print(
            f"\n5 readers got {len(expected)} chars in {elapsed * 1000:.0f} ms beside a stalled "
            f"subscriber with {stalled_queue} bytes queued for it"
        )

        # The stalled subscriber, once it reads, still gets the whole answer.
        events = await EventStream(stalled).until_turn_ends()
        assert answer_text(events) == expected


async def test_a_thousand_subscribers_coming_and_going_leave_nothing_behind(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    script = answer_script(["still ", "here"])
    script.steps.insert(2, WaitFor(gate))
    fake_upstream.enqueue(script)
    chorus = await start_chorus()
    created = await chorus.create()
    log = chorus.registry.get(created["id"]).log
    await eventually(lambda: log.last_seq == 2)
    watcher = await chorus.subscribe(created["id"])
    await eventually(lambda: log.subscriber_count == 1)
    gc.collect()
    tasks_before = len(asyncio.all_tasks())
    fds_before = len(os.listdir("/proc/self/fd"))

    async def come_and_go(cycles: int) -> None:
        for _ in range(cycles):
            stream = await chorus.subscribe(created["id"])
            first = await stream.next_event()
            assert first.event == "turn"
            stream.close()

    await asyncio.gather(*(come_and_go(50) for _ in range(20)))
    await eventually(lambda: log.subscriber_count == 1)
    await eventually(lambda: len(chorus.server.runner.server.connections) == 1)
    await eventually(lambda: len(asyncio.all_tasks()) <= tasks_before)
    gc.collect()
    assert sum(isinstance(o, MemoryCursor) for o in gc.get_objects()) == 1
    assert len(os.listdir("/proc/self/fd")) <= fds_before

    gate.set()
    events = await watcher.until_turn_ends()
    assert answer_text(events) == "still here"
