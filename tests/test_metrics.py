"""`GET /metrics` and `GET /readyz`: every value matches what the test did, exactly."""

from __future__ import annotations

import asyncio
import socket
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

import server.events_route
from server.app_keys import HUB, METRICS, READINESS
from server.hub import MemoryEventLog, SubscriberTally
from server.metrics import TURN_OUTCOMES

from .conftest import Chorus, EventStream, StartChorus, eventually, expect_json_error
from .fake_upstream import (
    FakeUpstream,
    Hang,
    Respond,
    Script,
    Send,
    WaitFor,
    answer_script,
    chunk,
    sse,
)

RETRY_HINT = b"retry: 2000\n\n"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(chorus: Chorus) -> tuple[Samples, dict[str, str]]:
    """Every sample of `GET /metrics`, keyed by (sample name, sorted labels); and the
    type of each metric family."""
    response = await chorus.client.get("/metrics")
    text = await response.text()
    assert response.status == 200, text
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def read_until_id(stream: EventStream, last_id: str) -> None:
    await stream.until(lambda event: event.id == last_id)


async def test_metrics_match_what_happened(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    # A small buffer: a subscriber from the start of a 7-event conversation gets a snapshot
    # (events 2..7 are kept, so the live subscribers at 1 never need one).
    chorus = await start_chorus(hub={"buffer_events": 6})
    registry = chorus.registry

    # Before anything: every status and outcome is there, at zero.
    samples, types = await scrape(chorus)
    for status in ("streaming", "done", "error", "cancelled"):
        assert value(samples, "chorus_conversations", status=status) == 0
    for outcome in TURN_OUTCOMES:
        assert value(samples, "chorus_upstream_requests_total", outcome=outcome) == 0
    assert value(samples, "chorus_time_to_first_token_seconds_count") == 0
    assert types["chorus_conversations"] == "gauge"
    assert types["chorus_upstream_requests"] == "counter"
    assert types["chorus_time_to_first_token_seconds"] == "histogram"
    assert types["chorus_upstream_duration_seconds"] == "histogram"

    # A: done, watched live by three subscribers; events turn(1), answer x5 (2..6), done(7).
    gate = asyncio.Event()
    script = answer_script(["a", "b", "c", "d", "e"])
    script.steps.insert(1, WaitFor(gate))
    fake_upstream.enqueue(script)
    a = await chorus.create()
    log_a = registry.get(a["id"]).log
    await eventually(lambda: log_a.last_seq == 1)
    live = [await chorus.subscribe(a["id"], query="?live=1") for _ in range(3)]
    await eventually(lambda: log_a.subscriber_count == 3)
    gate.set()
    for stream in live:
        await stream.until_turn_ends()
    assert log_a.last_seq == 7
    # A late joiner resumes after event 5, still buffered: a replay of events 6 and 7.
    late = await chorus.subscribe(a["id"], headers={"Last-Event-ID": "5"})
    await read_until_id(late, "7")
    assert [e.id for e in late.events] == ["6", "7"]
    # One from the start: event 1 has left the 6-event buffer, so one snapshot (seq 7).
    from_start = await chorus.subscribe(a["id"])
    await read_until_id(from_start, "7")
    assert [e.event for e in from_start.events] == ["snapshot"]
    late.close()
    from_start.close()
    await eventually(lambda: log_a.subscriber_count == 3)

    # B: HTTP 500 on every attempt: 1 + max_retries (2) requests, 2 retries, upstream_error.
    fake_upstream.enqueue(*(Script([Respond(500, b'{"error": "boom"}')]) for _ in range(3)))
    b = await chorus.create()
    await eventually(lambda: not registry.get(b["id"]).streaming)
    assert (await chorus.state(b["id"]))["status"] == "error"
    assert fake_upstream.calls == 4

    # C: cancelled after its first chunks: turn(1), answer(2), error(3).
    fake_upstream.enqueue(
        Script([Send(sse(chunk(role="assistant", content=""))), Send(sse(chunk(content="x"))),
                Hang()])
    )
    c = await chorus.create()
    log_c = registry.get(c["id"]).log
    await eventually(lambda: log_c.last_seq == 2)
    response = await chorus.client.post(f"/v1/conversations/{c['id']}/cancel")
    assert response.status == 202

    # D: still streaming (upstream has not even answered), so not in the histograms.
    hold = asyncio.Event()
    fake_upstream.enqueue(Script([WaitFor(hold)]))
    d = await chorus.create()
    await eventually(lambda: fake_upstream.calls == 6)

    samples, _ = await scrape(chorus)
    assert {
        status: value(samples, "chorus_conversations", status=status)
        for status in ("streaming", "done", "error", "cancelled")
    } == {"streaming": 1, "done": 1, "error": 1, "cancelled": 1}
    assert value(samples, "chorus_live_turns") == 1
    assert value(samples, "chorus_subscribers") == 3

    last_seqs = [registry.get(x["id"]).log.last_seq for x in (a, b, c, d)]
    assert last_seqs == [7, 2, 3, 1]
    assert value(samples, "chorus_events_published_total") == sum(last_seqs)
    # Three live subscribers x events 2..7, the late joiner's 2, the snapshot's 7.
    assert value(samples, "chorus_deliveries_total") == 3 * 6 + 2 + 7
    # Every byte the subscribers received but the retry hint (no heartbeats, no `end`).
    received = [bytes(stream.raw) for stream in (*live, late, from_start)]
    assert all(raw.startswith(RETRY_HINT) for raw in received)
    assert value(samples, "chorus_sent_bytes_total") == sum(
        len(raw) - len(RETRY_HINT) for raw in received
    )
    assert value(samples, "chorus_replays_total") == 2
    assert value(samples, "chorus_snapshots_total") == 1
    assert value(samples, "chorus_subscribers_dropped_total") == 0

    assert {
        outcome: value(samples, "chorus_upstream_requests_total", outcome=outcome)
        for outcome in TURN_OUTCOMES
    } == {
        "done": 1, "upstream_unavailable": 0, "upstream_error": 1, "upstream_timeout": 0,
        "upstream_protocol": 0, "cancelled": 1, "internal_error": 0,
    }
    assert value(samples, "chorus_upstream_retries_total") == 2
    # A and C had a first chunk; B never did; D has not.
    assert value(samples, "chorus_time_to_first_token_seconds_count") == 2
    assert value(samples, "chorus_time_to_first_token_seconds_bucket", le="+Inf") == 2
    # A, B and C ended; D has not.
    assert value(samples, "chorus_upstream_duration_seconds_count") == 3
    assert value(samples, "chorus_upstream_duration_seconds_bucket", le="+Inf") == 3
    assert value(samples, "chorus_upstream_duration_seconds_sum") > 0
    # No series is labelled by conversation.
    assert not any(a["id"] in repr(key) for key in samples)

    hold.set()
    for stream in live:
        stream.close()


async def test_each_app_has_its_own_registry(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    first = await start_chorus()
    second = await start_chorus()
    assert first.app[METRICS].registry is not second.app[METRICS].registry
    fake_upstream.enqueue(answer_script(["hi"]))
    created = await first.create()
    await eventually(lambda: not first.registry.get(created["id"]).streaming)

    ones, _ = await scrape(first)
    others, _ = await scrape(second)
    assert value(ones, "chorus_upstream_requests_total", outcome="done") == 1
    assert value(others, "chorus_upstream_requests_total", outcome="done") == 0
    assert value(ones, "chorus_events_published_total") == 3  # turn, answer, done
    assert value(others, "chorus_events_published_total") == 0


async def test_openmetrics_when_the_scraper_asks(start_chorus: StartChorus) -> None:
    chorus = await start_chorus()
    response = await chorus.client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text;")
    text = await response.text()
    assert text.endswith("# EOF\n")
    assert "chorus_subscribers 0" in text


async def test_a_stalled_subscriber_is_counted_as_dropped(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the send timeout may drop it here: the kernel's TCP_USER_TIMEOUT (set to the same
    # bound in production) would race it and end the stream as a reset instead.
    monkeypatch.setattr(server.events_route, "limit_unacknowledged_time", lambda *_: None)
    pieces = [f"[{i:04d}]" + "z" * 250 for i in range(1200)]  # ~300 KB, far past the buffers
    gate = asyncio.Event()
    script = answer_script(pieces)
    script.steps.insert(1, WaitFor(gate))
    fake_upstream.enqueue(script)
    chorus = await start_chorus(hub={"send_timeout": 0.5})
    created = await chorus.create()
    log = chorus.registry.get(created["id"]).log
    reader = await chorus.subscribe(created["id"])  # reads everything: never dropped

    # A client that sends its request and then never reads a byte, with a tiny window.
    assert chorus.server.port is not None
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(stalled, ("127.0.0.1", chorus.server.port))
        await loop.sock_sendall(
            stalled,
            f"GET {created['events_url']} HTTP/1.1\r\nHost: chorus\r\n\r\n".encode(),
        )
        await eventually(lambda: log.subscriber_count == 2)
        # And the server's side of it a small send buffer, so the backlog stays in Chorus.
        client_port = stalled.getsockname()[1]
        server_side = next(
            handler.transport
            for handler in chorus.server.runner.server.connections  # type: ignore[union-attr]
            if handler.transport is not None
            and handler.transport.get_extra_info("peername")[1] == client_port
        )
        server_side.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        gate.set()
        await reader.until_turn_ends()
        await eventually(lambda: log.subscriber_count == 1)
        samples, _ = await scrape(chorus)
        assert value(samples, "chorus_subscribers_dropped_total") == 1
        assert chorus.app[HUB].counters.dropped == 1
        assert value(samples, "chorus_subscribers") == 1
    finally:
        stalled.close()
        reader.close()


async def test_readyz_until_shutdown_begins(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    chorus = await start_chorus(server={"shutdown_grace_seconds": 30.0})
    response = await chorus.client.get("/readyz")
    assert response.status == 200
    assert orjson.loads(await response.read()) == {"status": "ready"}

    # A turn still streaming, so shutdown waits in its grace period.
    hold = asyncio.Event()
    fake_upstream.enqueue(Script([WaitFor(hold)]))
    created = await chorus.create()
    await eventually(lambda: fake_upstream.calls == 1)
    shutdown = asyncio.create_task(chorus.app.shutdown(), name="test-shutdown")
    await eventually(lambda: not chorus.app[READINESS].ready)
    assert not shutdown.done()

    await expect_json_error(
        await chorus.client.get("/readyz"), 503, "not_ready", "not ready: shutting_down",
        retry_after="1",
    )
    # Liveness is another question: the process still answers.
    response = await chorus.client.get("/healthz")
    assert response.status == 200
    assert orjson.loads(await response.read()) == {"status": "ok"}

    hold.set()
    await shutdown
    assert chorus.registry.all() == []  # the graceful part is over: the turn ended
    assert created["id"] not in [c.id for c in chorus.registry.all()]
    response = await chorus.client.get("/readyz")
    assert response.status == 503


class _ListSink:
    """A sink that takes everything (a subscriber's connection with room to spare)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def send(self, data: bytes) -> bool:
        self.writes.append(data)
        return True


async def test_a_shared_snapshot_counts_once_per_subscriber() -> None:
    tally = SubscriberTally()
    log = MemoryEventLog(max_events=2, max_bytes=1 << 20, tally=tally)
    log.publish("turn", {"turn": 0, "model": "m"})
    log.flush()
    sinks = [_ListSink() for _ in range(3)]
    for sink in sinks:
        log.subscribe(after=1).push_to(sink)
    # One batch longer than the buffer: the three subscribers at 1 share one snapshot.
    for piece in "abcd":
        log.publish("answer", {"turn": 0, "choice": 0, "content": piece})
    log.flush()
    assert [sink.writes for sink in sinks] == [[log.snapshot_frame()]] * 3
    assert tally.snapshots == 3
    assert tally.deliveries == 3 * 4
    assert tally.bytes_sent == 3 * len(log.snapshot_frame())


async def test_probes_and_metrics_need_no_api_key(
    start_chorus: StartChorus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHORUS_API_KEYS", "chorus-key-for-this-test-0123456789")
    chorus = await start_chorus()
    assert (await chorus.client.get("/v1/conversations")).status == 401
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await chorus.client.get(path)).status == 200, path
