"""The [limits] bounds: start-rate limiter (injected clock), then each bound over real sockets.

Each refusal is checked for its exact status, code, message and Retry-After; the
subscribers and conversations already admitted must not notice; and every count must
recover once subscribers leave or turns end.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse

from server.app_keys import HUB
from server.config import LimitsSettings
from server.errors import ServiceUnavailable, TooManyRequests
from server.limits import Limits, StartRateLimiter

from .conftest import (
    caller_header,
    start_chorus_with,
    FakeClock,
    StartChorus,
    answer_text,
    eventually,
    expect_json_error,
)
from .fake_upstream import FakeUpstream, answer_script, gated_script

HELLO = [{"role": "user", "content": "hello"}]


expect_error = expect_json_error


# --- the start-rate limiter, on an injected clock ----------------------------------------


def test_limiter_allows_limit_starts_then_refuses_until_the_oldest_leaves() -> None:
    clock = FakeClock(0.0)
    limiter = StartRateLimiter(limit=3, window_seconds=60.0, clock=clock)
    for moment in (0.0, 10.0, 20.0):
        clock.now = moment
        limiter.check("alice")
        limiter.record("alice")
    clock.now = 30.0
    with pytest.raises(TooManyRequests) as refused:
        limiter.check("alice")
    assert (refused.value.status, refused.value.code, refused.value.retry_after) == (
        429, "rate_limited", 30
    )
    assert refused.value.message == (
        "at most 3 conversation starts (creates and follow-ups) per 60 s per caller; "
        "try again later"
    )
    clock.now = 59.5
    with pytest.raises(TooManyRequests) as refused:
        limiter.check("alice")
    assert refused.value.retry_after == 1  # rounded up, never 0
    clock.now = 60.0  # the start at 0 has left the window
    limiter.check("alice")
    limiter.record("alice")
    clock.now = 65.0
    with pytest.raises(TooManyRequests) as refused:
        limiter.check("alice")
    assert refused.value.retry_after == 5  # the start at 10 leaves at 70
    assert limiter.starts_in_window("alice") == 3


def test_limiter_counts_only_recorded_starts_and_callers_apart() -> None:
    clock = FakeClock(0.0)
    limiter = StartRateLimiter(limit=1, clock=clock)
    for _ in range(5):
        limiter.check("alice")  # checked but never started: costs nothing
    limiter.record("alice")
    with pytest.raises(TooManyRequests):
        limiter.check("alice")
    limiter.check("bob")
    limiter.record("bob")
    assert (limiter.starts_in_window("alice"), limiter.starts_in_window("bob")) == (1, 1)


def test_limiter_forgets_idle_callers() -> None:
    clock = FakeClock(0.0)
    limiter = StartRateLimiter(limit=2, window_seconds=60.0, clock=clock)
    for index in range(100):
        clock.now = index * 0.1
        limiter.record(f"caller-{index}")
    assert limiter.tracked_callers == 100
    clock.now = 60.05  # caller-0's start (at 0.0) has left the window, caller-1's not
    limiter.check("newcomer")
    assert limiter.tracked_callers == 99
    clock.now = 200.0
    limiter.check("newcomer")
    assert limiter.tracked_callers == 0


def test_limiter_memory_per_caller_is_bounded_by_the_limit() -> None:
    clock = FakeClock(0.0)
    limiter = StartRateLimiter(limit=3, clock=clock)
    for _ in range(1000):
        limiter.record("alice")  # recorded without checking: still at most 3 kept
    assert limiter.starts_in_window("alice") == 3


def test_limiter_refuses_new_callers_when_full_of_active_ones() -> None:
    clock = FakeClock(0.0)
    limiter = StartRateLimiter(limit=5, window_seconds=60.0, max_callers=2, clock=clock)
    limiter.record("alice")
    clock.now = 10.0
    limiter.record("bob")
    clock.now = 20.0
    with pytest.raises(ServiceUnavailable) as refused:
        limiter.check("carol")
    assert (refused.value.status, refused.value.code, refused.value.retry_after) == (
        503, "too_many_callers", 40
    )
    limiter.check("alice")  # callers already tracked are not affected
    clock.now = 60.0  # alice's only start left the window: her slot is free
    limiter.check("carol")
    limiter.record("carol")
    assert limiter.tracked_callers == 2


def test_limiter_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError):
        StartRateLimiter(limit=0)
    with pytest.raises(ValueError):
        StartRateLimiter(limit=1, window_seconds=0.0)
    with pytest.raises(ValueError):
        StartRateLimiter(limit=1, max_callers=0)


def test_zero_means_unlimited() -> None:
    limits = Limits(
        LimitsSettings(
            max_subscribers_per_conversation=0, max_subscribers_total=0,
            starts_per_minute_per_key=0,
        )
    )
    limits.admit_subscriber(conversation_subscribers=10**9, total_subscribers=10**9)
    for _ in range(1000):
        limits.check_start("alice")
        limits.record_start("alice")


# --- over HTTP -----------------------------------------------------------------------------


async def test_body_over_max_body_bytes_is_413(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    chorus = await start_chorus(server={"max_body_bytes": 100})
    body = orjson.dumps({"messages": [{"role": "user", "content": "x" * 100}]})
    response = await chorus.client.post("/v1/conversations", data=body)
    await expect_error(response, 413, "body_too_large", "request body exceeds 100 bytes", None)
    assert fake_upstream.calls == 0


async def test_too_many_messages_is_413(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["ok"]))
    chorus = await start_chorus(limits={"max_messages": 3})
    four = [{"role": "user", "content": str(i)} for i in range(4)]
    response = await chorus.client.post("/v1/conversations", json={"messages": four})
    await expect_error(
        response, 413, "too_many_messages",
        "messages has 4 entries; at most 3 are accepted", None,
    )
    # Counted before the messages are checked: 1000 malformed ones are still "too many".
    response = await chorus.client.post("/v1/conversations", json={"messages": [1] * 1000})
    await expect_error(
        response, 413, "too_many_messages",
        "messages has 1000 entries; at most 3 are accepted", None,
    )
    assert fake_upstream.calls == 0
    created = await chorus.create(messages=four[:3])
    subscriber = await chorus.subscribe(created["id"])
    assert answer_text(await subscriber.until_turn_ends()) == "ok"
    assert fake_upstream.calls == 1
    assert len(fake_upstream.requests[0]["messages"]) == 3


async def test_live_conversations_bound_refuses_creates_and_follow_ups(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate_b, gate_c = asyncio.Event(), asyncio.Event()
    fake_upstream.enqueue(
        answer_script(["a"]), gated_script(gate_b, ["b"]), gated_script(gate_c, ["c"]),
        answer_script(["d"]), answer_script(["a2"]),
    )
    chorus = await start_chorus(limits={"max_live_conversations": 2})
    a = await chorus.create()
    watcher_a = await chorus.subscribe(a["id"])
    await watcher_a.until_turn_ends(0)
    await eventually(lambda: chorus.registry.live_turns == 0)
    b = await chorus.create()
    await chorus.create()  # c: holds the second live slot
    watcher_b = await chorus.subscribe(b["id"])
    await eventually(lambda: fake_upstream.active == 2)
    assert chorus.registry.live_turns == 2

    message = (
        "2 answers are streaming, the most this server runs at once; "
        "try again in a few seconds"
    )
    response = await chorus.client.post("/v1/conversations", json={"messages": HELLO})
    await expect_error(response, 429, "too_many_live_conversations", message, "5")
    response = await chorus.client.post(
        f"/v1/conversations/{a['id']}/messages", json={"content": "more"}
    )
    await expect_error(response, 429, "too_many_live_conversations", message, "5")
    # A follow-up on a conversation that is itself streaming is still a conflict.
    response = await chorus.client.post(
        f"/v1/conversations/{b['id']}/messages", json={"content": "more"}
    )
    assert response.status == 409
    assert (await response.json())["error"]["code"] == "turn_in_progress"
    assert fake_upstream.calls == 3
    assert len(chorus.registry) == 3

    # The refusals cost the streaming conversations nothing; once one ends, room is back.
    gate_b.set()
    assert answer_text(await watcher_b.until_turn_ends(0)) == "b"
    await eventually(lambda: chorus.registry.live_turns == 1)
    d = await chorus.create()
    assert d["status"] == "streaming"
    gate_c.set()
    await eventually(lambda: chorus.registry.live_turns == 0)
    response = await chorus.client.post(
        f"/v1/conversations/{a['id']}/messages", json={"content": "more"}
    )
    assert response.status == 202, await response.text()
    assert answer_text(await watcher_a.until_turn_ends(1), turn=1) == "a2"
    await eventually(lambda: chorus.registry.live_turns == 0)
    assert fake_upstream.calls == 5


async def test_live_turns_count_recovers_on_cancel_and_delete(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(gated_script(gate, ["x"]), gated_script(gate, ["y"]), answer_script(["z"]))
    chorus = await start_chorus(limits={"max_live_conversations": 2})
    first = await chorus.create()
    second = await chorus.create()
    assert chorus.registry.live_turns == 2
    response = await chorus.client.post(f"/v1/conversations/{first['id']}/cancel")
    assert response.status == 202
    response = await chorus.client.delete(f"/v1/conversations/{second['id']}")
    assert response.status == 204
    await eventually(lambda: chorus.registry.live_turns == 0)
    third = await chorus.create()
    assert answer_text(await (await chorus.subscribe(third["id"])).until_turn_ends()) == "z"
    assert fake_upstream.calls == 3


async def test_subscribers_per_conversation_bound_is_429(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(gated_script(gate, ["one", " two"]), gated_script(gate, ["other"]))
    chorus = await start_chorus(limits={"max_subscribers_per_conversation": 2})
    full = await chorus.create()
    other = await chorus.create()
    first = await chorus.subscribe(full["id"])
    second = await chorus.subscribe(full["id"])
    assert (first.status, second.status) == (200, 200)

    response = await chorus.client.get(f"/v1/conversations/{full['id']}/events")
    await expect_error(
        response, 429, "too_many_subscribers",
        "this conversation has its maximum of 2 subscribers; try again later", "5",
    )
    assert chorus.registry.get(full["id"]).log.subscriber_count == 2
    # Another conversation is not affected.
    elsewhere = await chorus.subscribe(other["id"])
    assert elsewhere.status == 200

    gate.set()
    assert answer_text(await first.until_turn_ends()) == "one two"
    assert answer_text(await second.until_turn_ends()) == "one two"
    assert answer_text(await elsewhere.until_turn_ends()) == "other"

    second.close()
    await eventually(lambda: chorus.registry.get(full["id"]).log.subscriber_count == 1)
    late = await chorus.subscribe(full["id"])
    assert late.status == 200
    assert answer_text(await late.until_turn_ends()) == "one two"


async def test_subscribers_total_bound_is_503_and_the_total_is_kept_by_the_hub(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(gated_script(gate, ["A"]), gated_script(gate, ["B"]))
    chorus = await start_chorus(limits={"max_subscribers_total": 3})
    hub = chorus.app[HUB]
    a = await chorus.create()
    b = await chorus.create()
    watchers = [
        await chorus.subscribe(a["id"]),
        await chorus.subscribe(a["id"]),
        await chorus.subscribe(b["id"]),
    ]
    assert [w.status for w in watchers] == [200, 200, 200]
    assert hub.subscriber_count == 3

    message = "this server has its maximum of 3 subscribers; try again later"
    for conversation in (a, b):
        response = await chorus.client.get(f"/v1/conversations/{conversation['id']}/events")
        await expect_error(response, 503, "server_full", message, "5")
    assert hub.subscriber_count == 3

    watchers[0].close()
    await eventually(lambda: hub.subscriber_count == 2)
    replacement = await chorus.subscribe(b["id"])
    assert replacement.status == 200
    assert hub.subscriber_count == 3
    gate.set()
    assert answer_text(await watchers[1].until_turn_ends()) == "A"
    assert answer_text(await replacement.until_turn_ends()) == "B"

    # Deleting a conversation ends its streams; the total follows as their handlers detach.
    response = await chorus.client.delete(f"/v1/conversations/{a['id']}")
    assert response.status == 204
    await watchers[1].until_closed()
    await eventually(lambda: hub.subscriber_count == 2)
    for watcher in (watchers[2], replacement):
        watcher.close()
    await eventually(lambda: hub.subscriber_count == 0)


async def test_starts_per_minute_per_key_is_429_with_retry_after(
    aiohttp_server: Any, aiohttp_client: Any, fake_upstream: FakeUpstream
) -> None:
    clock = FakeClock(0.0)
    limits = Limits(
        LimitsSettings(starts_per_minute_per_key=2), identity=caller_header, clock=clock
    )
    chorus = await start_chorus_with(aiohttp_server, aiohttp_client, fake_upstream, LIMITS=limits)
    fake_upstream.enqueue(*(answer_script([str(i)]) for i in range(4)))
    alice = {"X-Caller": "alice"}

    async def create(headers: dict[str, str]) -> ClientResponse:
        return await chorus.client.post(
            "/v1/conversations", json={"messages": HELLO}, headers=headers
        )

    # A refused request is not a start: it costs nothing.
    response = await chorus.client.post("/v1/conversations", json={}, headers=alice)
    assert response.status == 400
    response = await create(alice)
    assert response.status == 201
    first = await response.json()
    watcher = await chorus.subscribe(first["id"])
    await watcher.until_turn_ends(0)
    await eventually(lambda: chorus.registry.live_turns == 0)
    clock.now = 10.0
    response = await chorus.client.post(
        f"/v1/conversations/{first['id']}/messages", json={"content": "more"}, headers=alice
    )
    assert response.status == 202  # follow-ups count too
    await watcher.until_turn_ends(1)

    clock.now = 15.0
    message = (
        "at most 2 conversation starts (creates and follow-ups) per 60 s per caller; "
        "try again later"
    )
    await expect_error(await create(alice), 429, "rate_limited", message, "45")
    response = await chorus.client.post(
        f"/v1/conversations/{first['id']}/messages", json={"content": "again"}, headers=alice
    )
    await expect_error(response, 429, "rate_limited", message, "45")
    assert fake_upstream.calls == 2

    # Another caller has its own budget.
    response = await create({"X-Caller": "bob"})
    assert response.status == 201
    clock.now = 59.0
    await expect_error(await create(alice), 429, "rate_limited", message, "1")
    clock.now = 60.0
    response = await create(alice)
    assert response.status == 201
    await eventually(lambda: chorus.registry.live_turns == 0)
    assert fake_upstream.calls == 4


async def test_starts_are_counted_per_api_key(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real wiring: callers are told apart by `auth.caller_identity` (the API key)."""
    monkeypatch.setenv("CHORUS_API_KEYS", "key-alice-0123456789,key-bob-0123456789")
    fake_upstream.enqueue(answer_script(["a"]), answer_script(["b"]))
    chorus = await start_chorus(limits={"starts_per_minute_per_key": 1})

    async def create(key: str) -> ClientResponse:
        return await chorus.client.post(
            "/v1/conversations", json={"messages": HELLO},
            headers={"Authorization": f"Bearer {key}"},
        )

    assert (await create("key-alice-0123456789")).status == 201
    response = await create("key-alice-0123456789")
    assert response.status == 429
    assert (await response.json())["error"]["code"] == "rate_limited"
    assert response.headers["Retry-After"] in {"59", "60"}
    assert (await create("key-bob-0123456789")).status == 201
    await eventually(lambda: chorus.registry.live_turns == 0)
    assert fake_upstream.calls == 2


async def test_firehose_streams_count_against_the_total_subscriber_bound(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(gated_script(gate, ["held"]))
    chorus = await start_chorus(limits={"max_subscribers_total": 1})
    created = await chorus.create()
    firehose = await chorus.client.get("/v1/events?all=1")
    assert firehose.status == 200
    refused = await chorus.client.get(created["events_url"])
    await expect_json_error(
        refused, 503, "server_full",
        "this server has its maximum of 1 subscribers; try again later", "5",
    )
    firehose.close()
    gate.set()


async def test_follow_ups_stop_when_the_history_would_pass_max_messages(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["zero"]), answer_script(["a"]), answer_script(["b"]))
    chorus = await start_chorus(limits={"max_messages": 5})
    created = await chorus.create()  # 1 message
    url = f"/v1/conversations/{created['id']}/messages"
    await eventually(lambda: not chorus.registry.get(created["id"]).streaming)
    assert (await chorus.client.post(url, json={"content": "a"})).status == 202  # 3 messages
    await eventually(lambda: not chorus.registry.get(created["id"]).streaming)
    assert (await chorus.client.post(url, json={"content": "b"})).status == 202  # 5 messages
    await eventually(lambda: not chorus.registry.get(created["id"]).streaming)
    await expect_json_error(
        await chorus.client.post(url, json={"content": "c"}),
        413, "too_many_messages",
        "this follow-up would make the conversation 7 messages long; at most 5 are "
        "accepted (limits.max_messages)",
    )
