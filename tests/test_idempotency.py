"""Idempotency-Key: the store on an injected clock, then creates and follow-ups over sockets.

A repeat with the same key and body gets the first answer byte for byte, marked
`Idempotent-Replayed: true`, and the upstream is called once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse

from server.app_keys import IDEMPOTENCY
from server.config import LimitsSettings
from server.errors import Conflict, InvalidRequest, ServiceUnavailable, UnprocessableEntity
from server.idempotency import (
    IdempotencyStore,
    StoredResponse,
    check_idempotency_key,
    fingerprint,
)
from server.limits import Limits

from .conftest import (
    caller_header,
    start_chorus_with,
    Chorus,
    FakeClock,
    StartChorus,
    answer_text,
    eventually,
    expect_json_error,
)
from .fake_upstream import FakeUpstream, answer_script, gated_script

HELLO = [{"role": "user", "content": "hello"}]
KEY = ("caller", "POST /v1/conversations", "key-1")
ANSWER = StoredResponse(201, b'{"id":"abc"}')


async def expect_error(
    response: ClientResponse, status: int, code: str, message: str, retry_after: str | None = None
) -> None:
    await expect_json_error(response, status, code, message, retry_after)
    assert "Idempotent-Replayed" not in response.headers


# --- the store, on an injected clock -------------------------------------------------------


def test_store_replays_a_finished_request_with_the_same_body() -> None:
    store = IdempotencyStore(window_seconds=60.0, clock=FakeClock())
    assert store.begin(KEY, fingerprint(b"body")) is None
    store.finish(KEY, ANSWER)
    store.abandon(KEY)  # after finish: a no-op
    assert store.begin(KEY, fingerprint(b"body")) == ANSWER
    assert store.begin(KEY, fingerprint(b"body")) == ANSWER
    assert len(store) == 1


def test_store_refuses_another_body_and_a_repeat_in_progress() -> None:
    store = IdempotencyStore(window_seconds=60.0, clock=FakeClock())
    assert store.begin(KEY, fingerprint(b"body")) is None
    with pytest.raises(Conflict) as in_progress:
        store.begin(KEY, fingerprint(b"body"))
    assert (in_progress.value.status, in_progress.value.code) == (409, "idempotency_key_in_progress")
    with pytest.raises(UnprocessableEntity) as reused:
        store.begin(KEY, fingerprint(b"other body"))
    assert (reused.value.status, reused.value.code) == (422, "idempotency_key_reused")
    store.finish(KEY, ANSWER)
    with pytest.raises(UnprocessableEntity):
        store.begin(KEY, fingerprint(b"other body"))


def test_store_forgets_an_abandoned_request() -> None:
    store = IdempotencyStore(window_seconds=60.0, clock=FakeClock())
    assert store.begin(KEY, fingerprint(b"body")) is None
    store.abandon(KEY)
    assert len(store) == 0
    # The retry runs, even with another body: nothing was answered under this key.
    assert store.begin(KEY, fingerprint(b"other body")) is None


def test_store_keys_are_per_caller_and_route() -> None:
    store = IdempotencyStore(window_seconds=60.0, clock=FakeClock())
    keys = [
        ("alice", "POST /v1/conversations", "k"),
        ("bob", "POST /v1/conversations", "k"),
        ("alice", "POST /v1/conversations/x/messages", "k"),
    ]
    for key in keys:
        assert store.begin(key, fingerprint(key[0].encode())) is None
        store.finish(key, ANSWER)
    assert len(store) == 3


def test_store_entries_expire_after_the_window() -> None:
    clock = FakeClock(0.0)
    store = IdempotencyStore(window_seconds=600.0, clock=clock)
    assert store.begin(KEY, fingerprint(b"body")) is None
    store.finish(KEY, ANSWER)
    clock.now = 599.9
    assert store.begin(KEY, fingerprint(b"body")) == ANSWER
    clock.now = 600.0
    assert len(store) == 0
    assert store.begin(KEY, fingerprint(b"another body")) is None


def test_store_full_of_live_entries_refuses_new_keys() -> None:
    clock = FakeClock(0.0)
    store = IdempotencyStore(window_seconds=100.0, max_entries=2, clock=clock)
    for index, moment in enumerate((0.0, 10.0)):
        clock.now = moment
        key = ("caller", "route", f"k{index}")
        assert store.begin(key, b"f") is None
        store.finish(key, ANSWER)
    clock.now = 20.5
    with pytest.raises(ServiceUnavailable) as full:
        store.begin(("caller", "route", "k2"), b"f")
    assert (full.value.status, full.value.code, full.value.retry_after) == (
        503, "idempotency_store_full", 80
    )
    assert store.begin(("caller", "route", "k0"), b"f") == ANSWER  # held keys still replay
    clock.now = 100.0  # k0 expired: room for one
    assert store.begin(("caller", "route", "k2"), b"f") is None
    assert len(store) == 2


def test_zero_window_remembers_nothing() -> None:
    store = IdempotencyStore(window_seconds=0.0, clock=FakeClock())
    assert store.begin(KEY, b"f") is None
    store.finish(KEY, ANSWER)
    assert store.begin(KEY, b"f") is None


@pytest.mark.parametrize("key", ["a", "A" * 255, "order-42/retry#1", " ~!\"$%&'()*+,-./:;<=>?@[\\]^_`{|}"])
def test_valid_keys(key: str) -> None:
    assert check_idempotency_key(key) == key


@pytest.mark.parametrize("key", ["", "A" * 256, "caf\u00e9", "tab\there", "del\x7f", "nul\x00"])
def test_invalid_keys(key: str) -> None:
    with pytest.raises(InvalidRequest) as invalid:
        check_idempotency_key(key)
    assert (invalid.value.status, invalid.value.code) == (400, "invalid_idempotency_key")


# --- over HTTP -----------------------------------------------------------------------------


async def post(
    chorus: Chorus, path: str, body: Any, key: str | None, **headers: str
) -> ClientResponse:
    if key is not None:
        headers["Idempotency-Key"] = key
    return await chorus.client.post(path, data=orjson.dumps(body), headers=headers)


async def test_repeated_create_returns_the_same_conversation_and_calls_upstream_once(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(gated_script(gate, ["once"]), answer_script(["other"]))
    chorus = await start_chorus()
    body = {"messages": HELLO}
    first = await post(chorus, "/v1/conversations", body, "create-1")
    assert first.status == 201
    assert "Idempotent-Replayed" not in first.headers
    first_body = await first.read()
    created = orjson.loads(first_body)
    watcher = await chorus.subscribe(created["id"])

    # The watch cookie set with the answer is part of it, and replayed with it.
    cookies = first.headers.getall("Set-Cookie")
    assert [c.split("=", 1)[0] for c in cookies] == [f"chorus_watch_{created['id']}"]
    assert f"={created['watch_token']};" in cookies[0]

    for _ in range(3):
        again = await post(chorus, "/v1/conversations", body, "create-1")
        assert again.status == 201
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.content_type == "application/json"
        assert await again.read() == first_body
        assert again.headers.getall("Set-Cookie") == cookies
    assert len(chorus.registry) == 1

    # The same key with another body is refused, and starts nothing either.
    response = await post(
        chorus, "/v1/conversations", {"messages": HELLO, "temperature": 0.5}, "create-1"
    )
    await expect_error(
        response, 422, "idempotency_key_reused",
        "this Idempotency-Key was already used with a different request body; "
        "use a new key for a new request",
    )
    gate.set()
    assert answer_text(await watcher.until_turn_ends()) == "once"
    assert fake_upstream.calls == 1
    assert len(chorus.registry) == 1

    # After the turn ended, the repeat still gets the first answer (as it was sent).
    again = await post(chorus, "/v1/conversations", body, "create-1")
    assert (again.status, await again.read()) == (201, first_body)
    # A new key is a new request.
    other = await post(chorus, "/v1/conversations", body, "create-2")
    assert other.status == 201
    assert (await other.json())["id"] != created["id"]
    await eventually(lambda: chorus.registry.live_turns == 0)
    assert fake_upstream.calls == 2


async def test_repeated_follow_up_starts_one_turn(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(
        answer_script(["first"]), answer_script(["second"]), answer_script(["third"])
    )
    chorus = await start_chorus()
    created = await chorus.create()
    watcher = await chorus.subscribe(created["id"])
    await watcher.until_turn_ends(0)
    path = f"/v1/conversations/{created['id']}/messages"

    first = await post(chorus, path, {"content": "more"}, "follow-1")
    assert first.status == 202
    first_body = await first.read()
    assert orjson.loads(first_body)["turn"] == 1
    again = await post(chorus, path, {"content": "more"}, "follow-1")
    assert (again.status, again.headers["Idempotent-Replayed"]) == (202, "true")
    assert await again.read() == first_body  # not 409 turn_in_progress: nothing was started
    assert answer_text(await watcher.until_turn_ends(1), turn=1) == "second"
    again = await post(chorus, path, {"content": "more"}, "follow-1")
    assert (again.status, await again.read()) == (202, first_body)  # no turn 2

    response = await post(chorus, path, {"content": "different"}, "follow-1")
    assert response.status == 422
    # The same key on the create route is another request altogether.
    response = await post(chorus, "/v1/conversations", {"messages": HELLO}, "follow-1")
    assert response.status == 201
    assert (await chorus.state(created["id"]))["messages"] == [
        *HELLO, {"role": "user", "content": "more"}
    ]
    await eventually(lambda: chorus.registry.live_turns == 0)
    assert fake_upstream.calls == 3


async def test_errors_are_not_remembered(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(gated_script(gate, ["busy"]), answer_script(["ok"]))
    chorus = await start_chorus(limits={"max_live_conversations": 1})
    busy = await chorus.create()
    body = {"messages": HELLO}
    response = await post(chorus, "/v1/conversations", body, "retry-me")
    assert response.status == 429
    assert response.headers["Retry-After"] == "5"
    assert "Idempotent-Replayed" not in response.headers
    # Nor is a 400: the same key with a fixed body is just the first real request.
    response = await post(chorus, "/v1/conversations", {"messages": []}, "retry-me")
    assert response.status == 400

    gate.set()
    await eventually(lambda: chorus.registry.live_turns == 0)
    response = await post(chorus, "/v1/conversations", body, "retry-me")
    assert response.status == 201
    assert "Idempotent-Replayed" not in response.headers
    created = await response.json()
    assert created["id"] != busy["id"]
    again = await post(chorus, "/v1/conversations", body, "retry-me")
    assert (await again.json(), again.headers["Idempotent-Replayed"]) == (created, "true")
    await eventually(lambda: chorus.registry.live_turns == 0)
    assert fake_upstream.calls == 2


async def test_invalid_keys_are_400_and_start_nothing(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    chorus = await start_chorus()
    message = "Idempotency-Key must be 1 to 255 printable ASCII characters"
    for key in ["", "k" * 256, "caf\u00e9"]:
        response = await chorus.client.post(
            "/v1/conversations", data=orjson.dumps({"messages": HELLO}),
            headers={"Idempotency-Key": key},
        )
        await expect_error(response, 400, "invalid_idempotency_key", message)
    response = await chorus.client.post(
        "/v1/conversations", data=orjson.dumps({"messages": HELLO}),
        headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
    )
    await expect_error(
        response, 400, "invalid_idempotency_key", "send one Idempotency-Key header, not several"
    )
    response = await chorus.client.post(
        "/v1/conversations/AAAA/messages", data=b'{"content": "x"}',
        headers={"Idempotency-Key": ""},
    )
    await expect_error(response, 400, "invalid_idempotency_key", message)
    assert fake_upstream.calls == 0
    assert len(chorus.registry) == 0
    assert len(chorus.app[IDEMPOTENCY]) == 0


async def test_window_expiry_over_http(
    aiohttp_server: Any, aiohttp_client: Any, fake_upstream: FakeUpstream
) -> None:
    clock = FakeClock(0.0)
    store = IdempotencyStore(window_seconds=600.0, clock=clock)
    chorus = await start_chorus_with(
        aiohttp_server, aiohttp_client, fake_upstream, IDEMPOTENCY=store
    )
    fake_upstream.enqueue(answer_script(["a"]), answer_script(["b"]))
    body = {"messages": HELLO}
    first = await (await post(chorus, "/v1/conversations", body, "k")).json()
    clock.now = 599.0
    again = await post(chorus, "/v1/conversations", body, "k")
    assert (await again.json(), again.headers["Idempotent-Replayed"]) == (first, "true")
    clock.now = 600.0
    later = await post(chorus, "/v1/conversations", body, "k")
    assert later.status == 201
    assert "Idempotent-Replayed" not in later.headers
    assert (await later.json())["id"] != first["id"]
    await eventually(lambda: chorus.registry.live_turns == 0)
    assert fake_upstream.calls == 2


async def test_keys_are_per_caller_and_replays_cost_no_rate_budget(
    aiohttp_server: Any, aiohttp_client: Any, fake_upstream: FakeUpstream
) -> None:
    clock = FakeClock(0.0)
    limits = Limits(
        LimitsSettings(starts_per_minute_per_key=1), identity=caller_header, clock=clock
    )
    chorus = await start_chorus_with(aiohttp_server, aiohttp_client, fake_upstream, LIMITS=limits)
    fake_upstream.enqueue(answer_script(["a"]), answer_script(["b"]))
    body = {"messages": HELLO}
    alice = await post(chorus, "/v1/conversations", body, "k", **{"X-Caller": "alice"})
    assert alice.status == 201
    # Alice's budget is spent, but her retry is answered from the store.
    retry = await post(chorus, "/v1/conversations", body, "k", **{"X-Caller": "alice"})
    assert (retry.status, retry.headers["Idempotent-Replayed"]) == (201, "true")
    assert await retry.json() == await alice.json()
    response = await post(chorus, "/v1/conversations", body, "k2", **{"X-Caller": "alice"})
    assert (response.status, response.headers["Retry-After"]) == (429, "60")
    # Bob's "k" is his own.
    bob = await post(chorus, "/v1/conversations", body, "k", **{"X-Caller": "bob"})
    assert bob.status == 201
    assert "Idempotent-Replayed" not in bob.headers
    assert (await bob.json())["id"] != (await alice.json())["id"]
    await eventually(lambda: chorus.registry.live_turns == 0)
    assert fake_upstream.calls == 2
