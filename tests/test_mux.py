"""`GET /v1/events`: many conversations in one stream, and the firehose, on real sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from server.app import create_app
from server.app_keys import FIREHOSE, HUB
from server.multiplex import (
    InvalidIds,
    InvalidPosition,
    Multiplexer,
    parse_conversation_ids,
    parse_position,
    split_frames,
)
from server.sse import ServerSentEvent

from .conftest import Chorus, EventStream, StartChorus, eventually, make_settings
from .fake_upstream import (
    DONE,
    FakeUpstream,
    Respond,
    Script,
    Send,
    Step,
    WaitFor,
    answer_script,
    chunk,
    sse,
    usage_chunk,
)


def gated_script(pieces: list[str], gates: list[asyncio.Event]) -> Script:
    """A well-formed answer whose piece i is sent only once gates[i] is set."""
    steps: list[Step] = [Send(sse(chunk(role="assistant", content="")))]
    for piece, gate in zip(pieces, gates):
        steps += [WaitFor(gate), Send(sse(chunk(content=piece)))]
    steps += [Send(sse(chunk(finish_reason="stop"))), Send(sse(usage_chunk())), Send(DONE)]
    return Script(steps)


async def events_stream(
    chorus: Chorus, query: str, headers: dict[str, str] | None = None
) -> EventStream:
    response = await chorus.client.get(f"/v1/events?{query}", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream"
    return EventStream(response)


async def error_of(chorus: Chorus, query: str, **headers: str) -> tuple[int, dict[str, Any]]:
    response = await chorus.client.get(f"/v1/events?{query}", headers=headers)
    body: dict[str, Any] = await response.json()
    return response.status, body["error"]


def data(event: ServerSentEvent) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(event.data)
    return result


def per_conversation(events: list[ServerSentEvent]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    seen: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for event in events:
        if event.event in ("end",):
            continue
        payload = data(event)
        seen.setdefault(payload["conversation"], []).append((event.event, payload))
    return seen


def text_of(events: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(p["content"] for kind, p in events if kind == "answer")


@pytest.fixture
def held(start_chorus: StartChorus) -> Iterator[list[asyncio.Event]]:
    """Upstream gates, all opened at teardown (before the servers stop), so no turn is
    left waiting on one."""
    opened: list[asyncio.Event] = []
    yield opened
    for gate in opened:
        gate.set()


async def create_gated(
    chorus: Chorus,
    fake_upstream: FakeUpstream,
    prompt: str,
    pieces: list[str],
    opened_at_teardown: list[asyncio.Event],
) -> tuple[str, list[asyncio.Event]]:
    gates = [asyncio.Event() for _ in pieces]
    opened_at_teardown.extend(gates)
    fake_upstream.scripts_by_prompt[prompt] = gated_script(pieces, gates)
    created = await chorus.create(messages=[{"role": "user", "content": prompt}])
    conversation_id: str = created["id"]
    log = chorus.registry.get(conversation_id).log
    await eventually(lambda: log.last_seq == 1)  # its `turn` event
    return conversation_id, gates


# --- the combined stream --------------------------------------------------------------------


async def test_conversations_interleave_each_in_its_own_order(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, held: list[asyncio.Event]
) -> None:
    chorus = await start_chorus()
    texts = {"A": ["The ", "quick ", "fox"], "B": ["Lorem ", "ipsum"], "C": ["1", "2", "3", "4"]}
    ids: dict[str, str] = {}
    gates: dict[str, list[asyncio.Event]] = {}
    for name, pieces in texts.items():
        ids[name], gates[name] = await create_gated(chorus, fake_upstream, name, pieces, held)
    a, b, c = ids["A"], ids["B"], ids["C"]
    stream = await events_stream(chorus, f"conversations={a},{b},{c}")

    # The first write: the retry hint and the three `turn` events, byte for byte.
    for _ in range(3):
        await stream.next_event()
    turn = b'"turn":0,"model":"test-model"}\n\n'
    assert bytes(stream.raw) == (
        b"retry: 2000\n\n"
        b'id: 1.0.0\nevent: turn\ndata: {"conversation":"%b","seq":1,%b'
        b'id: 1.1.0\nevent: turn\ndata: {"conversation":"%b","seq":1,%b'
        b'id: 1.1.1\nevent: turn\ndata: {"conversation":"%b","seq":1,%b'
        % (a.encode(), turn, b.encode(), turn, c.encode(), turn)
    )

    # Release pieces round-robin; each arrives tagged with its conversation, in order.
    order = ["C", "A", "B", "C", "A", "C", "B", "A", "C"]
    for name in order:
        gate = next(g for g in gates[name] if not g.is_set())
        gate.set()
        event = (await stream.until(lambda e: e.event == "answer"))[-1]
        assert data(event)["conversation"] == ids[name]

    # Every turn ends: the stream does not (the conversations are still held).
    def done() -> list[str]:
        return [data(e)["conversation"] for e in stream.events if e.event == "done"]

    while len(done()) < 3:
        await stream.next_event()
    assert sorted(done()) == sorted(ids.values())

    seen = per_conversation(stream.events)
    for name, conversation_id in ids.items():
        events = seen[conversation_id]
        seqs = [payload["seq"] for _, payload in events]
        assert seqs == list(range(1, len(texts[name]) + 3))  # turn, answers, done
        assert text_of(events) == "".join(texts[name])
        state = await chorus.state(conversation_id)
        assert state["turns"][0]["choices"][0]["content"] == "".join(texts[name])
        # The tag is spliced in front of the conversation event's own fields, which follow
        # unchanged: the same JSON as on the conversation's own stream.
        assert [kind for kind, _ in events] == ["turn", *["answer"] * len(texts[name]), "done"]
        assert events[-1][1] == {
            "conversation": conversation_id, "seq": seqs[-1], "turn": 0,
            "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 5,
                                               "total_tokens": 8},
            "choices": [{"choice": 0, "finish_reason": "stop"}],
        }
    # Each id is the whole position after that event.
    positions = {conversation_id: 0 for conversation_id in ids.values()}
    for event in stream.events:
        payload = data(event)
        positions[payload["conversation"]] = payload["seq"]
        assert event.id == ".".join(str(positions[i]) for i in (a, b, c))
    # Nothing is in flight: the stream is idle, open, and counted once per conversation.
    assert [chorus.registry.get(i).log.subscriber_count for i in (a, b, c)] == [1, 1, 1]
    stream.close()


async def test_resume_by_last_event_id_has_no_gap_and_no_duplicate(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, held: list[asyncio.Event]
) -> None:
    chorus = await start_chorus()
    a, gates_a = await create_gated(chorus, fake_upstream, "A", ["a1", "a2", "a3", "a4"], held)
    b, gates_b = await create_gated(chorus, fake_upstream, "B", ["b1", "b2", "b3"], held)
    first = await events_stream(chorus, f"conversations={a},{b}")
    await first.next_event()
    await first.next_event()
    gates_a[0].set()
    gates_b[0].set()
    await first.next_event()
    await first.next_event()
    last_id = first.events[-1].id
    assert last_id == "2.2"
    first.close()
    await eventually(lambda: chorus.app[HUB].subscriber_count == 0)

    # While nobody watches: more of both, and A finishes.
    for gate in (*gates_a[1:], gates_b[1]):
        gate.set()
    log_a, log_b = chorus.registry.get(a).log, chorus.registry.get(b).log
    await eventually(lambda: log_a.last_seq == 6 and log_b.last_seq == 3)

    assert last_id is not None
    second = await events_stream(chorus, f"conversations={a},{b}", {"Last-Event-ID": last_id})
    await second.until(lambda e: e.event == "done")
    gates_b[2].set()
    await second.until(lambda e: e.event == "done" and data(e)["conversation"] == b)

    for conversation_id, pieces in ((a, "a1a2a3a4"), (b, "b1b2b3")):
        events = per_conversation(first.events)[conversation_id]
        events += per_conversation(second.events)[conversation_id]
        seqs = [payload["seq"] for _, payload in events]
        assert seqs == list(range(1, len(seqs) + 1))
        assert text_of(events) == pieces
    assert second.events[0].id == "3.2"  # the replay starts right after the position
    assert second.events[-1].id == "6.5"

    # `?after=` does the same for clients without headers.
    third = await events_stream(chorus, f"conversations={a},{b}&after=5.5")
    event = await third.next_event()
    assert (event.event, event.id, data(event)["seq"]) == ("done", "6.5", 6)
    # `?live=1`: nothing from before.
    live = await events_stream(chorus, f"conversations={a},{b}&live=1")
    await chorus.client.delete(f"/v1/conversations/{a}")
    event = await live.next_event()
    assert (event.event, event.id, data(event)) == (
        "conversation_end", "x.5", {"conversation": a, "reason": "deleted"}
    )
    for stream in (second, third, live):
        stream.close()


async def test_a_conversation_ending_does_not_end_the_stream(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, held: list[asyncio.Event]
) -> None:
    chorus = await start_chorus()
    a, gates_a = await create_gated(chorus, fake_upstream, "A", ["a1", "a2"], held)
    b, gates_b = await create_gated(chorus, fake_upstream, "B", ["b1", "b2"], held)
    unknown = "no-such-conversation"
    stream = await events_stream(chorus, f"conversations={unknown},{a},{b}")
    # An unknown id is over at once; the others are followed.
    event = await stream.next_event()
    assert (event.event, event.id, data(event)) == (
        "conversation_end", "x.0.0", {"conversation": unknown, "reason": "not_found"}
    )
    assert bytes(stream.raw).startswith(
        b'retry: 2000\n\nid: x.0.0\nevent: conversation_end\ndata: {"conversation":"%b",'
        b'"reason":"not_found"}\n\n' % unknown.encode()
    )
    await stream.next_event()
    await stream.next_event()

    # A finishes its turn (done), then is deleted: B goes on.
    for gate in gates_a:
        gate.set()
    await stream.until(lambda e: e.event == "done")
    response = await chorus.client.delete(f"/v1/conversations/{a}")
    assert response.status == 204
    event = await stream.next_event()
    assert (event.event, event.id, data(event)) == (
        "conversation_end", "x.x.1", {"conversation": a, "reason": "deleted"}
    )
    assert chorus.registry.get(b).log.subscriber_count == 1
    gates_b[0].set()
    event = await stream.next_event()
    assert (event.event, event.id, data(event)["content"]) == ("answer", "x.x.2", "b1")

    # B deleted mid-turn: its `error` (cancelled), its end, then the stream's own end.
    await chorus.client.delete(f"/v1/conversations/{b}")
    tail = [(e.event, e.id, data(e)) for e in (await stream.until_closed())[-3:]]
    assert tail[0][0:2] == ("error", "x.x.3")
    assert tail[0][2]["code"] == "cancelled"
    assert tail[1] == ("conversation_end", "x.x.x", {"conversation": b, "reason": "deleted"})
    assert tail[2] == ("end", "x.x.x", {"reason": "deleted"})  # no id of its own
    assert bytes(stream.raw).endswith(b'event: end\ndata: {"reason":"deleted"}\n\n')
    assert chorus.app[HUB].subscriber_count == 0


async def test_a_cursor_behind_its_buffer_gets_that_conversations_snapshot(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    chorus = await start_chorus(hub={"buffer_events": 3})
    fake_upstream.enqueue(answer_script(["x1", "x2", "x3", "x4", "x5"]))
    a = (await chorus.create())["id"]
    log_a = chorus.registry.get(a).log
    await eventually(lambda: log_a.last_seq == 7)
    stream = await events_stream(chorus, f"conversations={a}")
    event = await stream.next_event()
    assert (event.event, event.id) == ("snapshot", "7")
    snapshot = data(event)
    assert list(snapshot)[:3] == ["conversation", "seq", "turns"]  # one `seq`, the snapshot's
    assert (snapshot["conversation"], snapshot["seq"]) == (a, 7)
    assert snapshot["turns"][0]["choices"][0]["content"] == "x1x2x3x4x5"
    stream.close()


@pytest.mark.parametrize(
    ("query", "headers", "status", "code"),
    [
        ("", {}, 400, "invalid_query"),
        ("all=1&conversations=abc", {}, 400, "invalid_query"),
        ("all=maybe", {}, 400, "invalid_all"),
        ("conversations=", {}, 400, "invalid_conversations"),
        ("conversations=a,,b", {}, 400, "invalid_conversations"),
        ("conversations=a,a", {}, 400, "invalid_conversations"),
        ("conversations=a%2Fb", {}, 400, "invalid_conversations"),
        ("conversations=" + ",".join(f"c{i}" for i in range(51)), {}, 400,
         "invalid_conversations"),
        ("conversations=unknown1,unknown2", {}, 404, "conversation_not_found"),
        ("conversations={a}", {"Last-Event-ID": "1.1"}, 400, "invalid_last_event_id"),
        ("conversations={a}", {"Last-Event-ID": "-1"}, 400, "invalid_last_event_id"),
        ("conversations={a}", {"Last-Event-ID": "1e3"}, 400, "invalid_last_event_id"),
        ("conversations={a}", {"Last-Event-ID": "99"}, 400, "invalid_last_event_id"),
        ("conversations={a},zz", {"Last-Event-ID": "1,0"}, 400, "invalid_last_event_id"),
        ("conversations={a}&after=2.", {}, 400, "invalid_after"),
        ("conversations={a}&after=99", {}, 400, "invalid_after"),
        ("conversations={a}&live=2", {}, 400, "invalid_live"),
        ("conversations={a}", {"Last-Event-ID": "x"}, 404, "conversation_not_found"),
        ("all=1", {"Last-Event-ID": "1.0"}, 400, "invalid_last_event_id"),
        ("all=1", {"Last-Event-ID": "99"}, 400, "invalid_last_event_id"),
        ("all=1&after=-3", {}, 400, "invalid_after"),
    ],
)
async def test_malformed_requests_are_json_errors(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, query: str,
    headers: dict[str, str], status: int, code: str,
) -> None:
    chorus = await start_chorus()
    fake_upstream.enqueue(answer_script(["hi"]))
    a = (await chorus.create())["id"]
    log = chorus.registry.get(a).log
    await eventually(lambda: log.last_seq == 3)
    got_status, error = await error_of(chorus, query.format(a=a), **headers)
    assert (got_status, error["code"]) == (status, code)
    assert error["message"]
    assert chorus.app[HUB].subscriber_count == 0


async def test_a_position_for_other_conversations_is_explained(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, held: list[asyncio.Event]
) -> None:
    chorus = await start_chorus()
    a, _ = await create_gated(chorus, fake_upstream, "A", ["a"], held)
    b, _ = await create_gated(chorus, fake_upstream, "B", ["b"], held)
    response = await chorus.client.get(
        f"/v1/events?conversations={a},{b}", headers={"Last-Event-ID": "1"}
    )
    assert response.status == 400
    assert response.headers["Content-Type"] == "application/json"
    assert await response.read() == (
        b'{"error":{"code":"invalid_last_event_id","message":"Last-Event-ID must have one '
        b"entry per conversation (2), joined by '.', not 1\"}}"
    )
    assert await error_of(chorus, f"conversations={a},{b}", **{"Last-Event-ID": "1.2"}) == (
        400, {"code": "invalid_last_event_id",
              "message": "Last-Event-ID entry 2 is beyond that conversation's last event (1)"},
    )


async def test_the_combined_stream_counts_against_the_subscriber_limits(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, held: list[asyncio.Event]
) -> None:
    chorus = await start_chorus(limits={"max_subscribers_per_conversation": 1})
    a, _ = await create_gated(chorus, fake_upstream, "A", ["a"], held)
    b, _ = await create_gated(chorus, fake_upstream, "B", ["b"], held)
    viewer = await chorus.subscribe(b)
    assert viewer.status == 200
    assert await error_of(chorus, f"conversations={a},{b}") == (
        429, {"code": "too_many_subscribers",
              "message": "this conversation has its maximum of 1 subscribers; try again later"},
    )
    assert chorus.registry.get(a).log.subscriber_count == 0  # nothing attached on refusal
    stream = await events_stream(chorus, f"conversations={a}")
    await stream.next_event()
    assert chorus.registry.get(a).log.subscriber_count == 1
    viewer.close()
    stream.close()


async def test_api_key_and_watch_tokens(
    start_chorus: StartChorus,
    fake_upstream: FakeUpstream,
    held: list[asyncio.Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hold = asyncio.Event()
    held.append(hold)
    monkeypatch.setenv("CHORUS_API_KEYS", "key-one")
    chorus = await start_chorus(auth={"require_watch_token": True})
    fake_upstream.enqueue(Script([WaitFor(hold)]))
    response = await chorus.client.post(
        "/v1/conversations", json={"messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": "Bearer key-one"},
    )
    a = (await response.json())["id"]
    for query in (f"conversations={a}", "all=1"):
        assert (await error_of(chorus, query))[0] == 401
        assert (await error_of(chorus, query, Authorization="Bearer nope"))[0] == 401
        # A valid key is enough: it stands in for watch tokens.
        stream = await events_stream(chorus, query, {"X-API-Key": "key-one"})
        await stream.next_event()
        stream.close()


async def test_watch_tokens_without_api_keys(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, held: list[asyncio.Event]
) -> None:
    hold = asyncio.Event()
    held.append(hold)
    chorus = await start_chorus(auth={"require_watch_token": True})
    fake_upstream.enqueue(Script([WaitFor(hold)]), Script([WaitFor(hold)]))
    first, second = await chorus.create(), await chorus.create()
    a, b = first["id"], second["id"]
    tokens = f"{first['watch_token']},{second['watch_token']}"
    assert (await error_of(chorus, f"conversations={a},{b}"))[1]["code"] == "forbidden"
    swapped = f"{second['watch_token']},{first['watch_token']}"
    assert (await error_of(chorus, f"conversations={a},{b}&tokens={swapped}"))[0] == 403
    stream = await events_stream(chorus, f"conversations={a},{b}&tokens={tokens}")
    await stream.next_event()
    stream.close()
    # The firehose reveals ids, not answers, as the list does: no token.
    firehose = await events_stream(chorus, "all=1")
    assert (await firehose.next_event()).event == "snapshot"
    firehose.close()


def _handler_tasks() -> list[asyncio.Task[Any]]:
    """Tasks whose await chain is inside one of this route's handlers."""
    names = {"combined_events", "_multiplexed_events", "_firehose_events"}
    found = []
    for task in asyncio.all_tasks():
        coroutine: Any = task.get_coro()
        while coroutine is not None:
            code = getattr(coroutine, "cr_code", None)
            if code is not None and code.co_name in names:
                found.append(task)
                break
            coroutine = getattr(coroutine, "cr_await", None)
    return found


async def test_a_client_leaving_leaves_no_task_and_no_cursor(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, held: list[asyncio.Event]
) -> None:
    chorus = await start_chorus()
    a, gates = await create_gated(chorus, fake_upstream, "A", ["a1", "a2"], held)
    b, _ = await create_gated(chorus, fake_upstream, "B", ["b1"], held)
    firehose = chorus.app[FIREHOSE]
    streams = [
        await events_stream(chorus, f"conversations={a},{b}"),
        await events_stream(chorus, "all=1"),
    ]
    for stream in streams:
        await stream.next_event()
    gates[0].set()
    await streams[0].until(lambda e: e.event == "answer")
    assert len(_handler_tasks()) == 2
    assert chorus.app[HUB].subscriber_count == 2
    assert firehose.log.subscriber_count == 1
    for stream in streams:
        stream.close()
    await eventually(lambda: not _handler_tasks())
    assert chorus.app[HUB].subscriber_count == 0
    assert firehose.log.subscriber_count == 0
    # The turn goes on with nobody watching (hub.on_no_subscribers = keep).
    gates[1].set()
    log = chorus.registry.get(a).log
    await eventually(lambda: log.transcript.status == "done")


async def test_heartbeats_on_a_quiet_combined_stream_and_firehose(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, held: list[asyncio.Event]
) -> None:
    chorus = await start_chorus(hub={"heartbeat_seconds": 0.05})
    a, _ = await create_gated(chorus, fake_upstream, "A", ["a"], held)
    for query in (f"conversations={a}", "all=1&live=1"):
        response = await chorus.client.get(f"/v1/events?{query}")
        raw = b""
        async with asyncio.timeout(5):
            while raw.count(b": ping\n\n") < 2:
                raw += await response.content.readany()
        response.close()


# --- the firehose ---------------------------------------------------------------------------


def fold(table: dict[str, dict[str, Any]], event: ServerSentEvent) -> dict[str, dict[str, Any]]:
    """What a dashboard does with each firehose event (README)."""
    payload = data(event)
    if event.event == "snapshot":
        return {row["conversation"]: dict(row) for row in payload["conversations"]}
    if event.event == "created":
        table[payload["conversation"]] = {
            "conversation": payload["conversation"], "model": payload["model"],
            "created_at": payload["created_at"], "status": "streaming", "turn": None,
            "subscribers": 0, "chunks": 0, "tokens": 0, "tokens_estimated": True,
            "tokens_per_second": None, "ttft_seconds": None, "duration_seconds": None,
            "finish_reason": None, "error": None,
        }
    elif event.event == "conversation_ended":
        table.pop(payload["conversation"], None)
    elif event.event == "stats":
        for part in payload["conversations"]:
            if part["conversation"] in table:
                table[part["conversation"]].update(part)
    elif event.event == "turn_started":
        table[payload["conversation"]].update(
            status="streaming", turn=payload["turn"], model=payload["model"], chunks=0,
            tokens=0, tokens_estimated=True, tokens_per_second=None, ttft_seconds=None,
            duration_seconds=None, finish_reason=None, error=None,
        )
    elif event.event == "first_token":
        table[payload["conversation"]]["ttft_seconds"] = payload["ttft_seconds"]
    elif event.event in ("turn_done", "turn_error"):
        row = table[payload["conversation"]]
        for name in ("turn", "chunks", "tokens", "tokens_estimated", "tokens_per_second",
                     "ttft_seconds", "duration_seconds", "finish_reason"):
            row[name] = payload[name]
        if event.event == "turn_done":
            row.update(status="done", error=None)
        else:
            code = payload["code"]
            row["status"] = "cancelled" if code == "cancelled" else "error"
            row["error"] = {"code": code, "message": payload["message"]}
    return table


async def test_firehose_lifecycle_stats_and_resume(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    chorus = await start_chorus(upstream={"max_retries": 0})
    firehose = chorus.app[FIREHOSE]
    before = time.time()
    stream = await events_stream(chorus, "all=1")
    event = await stream.next_event()
    assert bytes(stream.raw) == (
        b'retry: 2000\n\nid: 0\nevent: snapshot\ndata: {"seq":0,"conversations":[],'
        b'"totals":null}\n\n'
    )

    # A: a done answer.
    fake_upstream.enqueue(answer_script(["Hello", ", ", "world"]))
    a = (await chorus.create(model="model-a"))["id"]
    events = await stream.until(lambda e: e.event == "turn_done")
    assert [(e.event, e.id) for e in events[1:]] == [
        ("created", "1"), ("turn_started", "2"), ("first_token", "3"), ("turn_done", "4"),
    ]
    created, started, first_token, done = (data(e) for e in events[1:])
    state = await chorus.state(a)
    assert created == {"conversation": a, "model": "model-a", "created_at": state["created_at"]}
    assert before <= created["created_at"] <= time.time()
    assert started == {"conversation": a, "turn": 0, "model": "model-a"}
    assert set(first_token) == {"conversation", "turn", "ttft_seconds"}
    assert 0 <= first_token["ttft_seconds"] < 5
    ttft, duration, rate = (
        done.pop("ttft_seconds"), done.pop("duration_seconds"), done.pop("tokens_per_second")
    )
    assert done == {
        "conversation": a, "turn": 0, "finish_reason": "stop",
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        "chunks": 3, "tokens": 5, "tokens_estimated": False,
    }
    assert ttft == first_token["ttft_seconds"]
    assert ttft <= duration < 5
    # Tokens over the time since the first chunk (none measurable when it was all at once).
    assert rate is None or rate > 0

    # B: the upstream refuses (no retries): a failed turn.
    fake_upstream.enqueue(Script([Respond(400, b'{"error": {"message": "bad request"}}')]))
    b = (await chorus.create())["id"]
    events = await stream.until(lambda e: e.event == "turn_error")
    assert [e.event for e in events[5:]] == ["created", "turn_started", "turn_error"]
    error = data(events[-1])
    b_state = await chorus.state(b)
    assert b_state["status"] == "error"
    assert error == {
        "conversation": b, "turn": 0, "finish_reason": None,
        "usage": b_state["turns"][0]["usage"], "chunks": 0, "tokens": 0,
        "tokens_estimated": True, "ttft_seconds": None,
        "duration_seconds": error["duration_seconds"], "tokens_per_second": None,
        "code": "upstream_error", "message": b_state["turns"][0]["error"]["message"],
    }
    assert "400" in error["message"]

    # Stats: subscribers per conversation (a combined stream counts once for each).
    viewers = [await chorus.subscribe(a), await chorus.subscribe(a)]
    combined = await events_stream(chorus, f"conversations={a},{b}")
    await combined.next_event()
    seq = firehose.publish_stats()
    assert seq == 8
    stats_event = await stream.next_event()
    assert (stats_event.event, stats_event.id) == ("stats", "8")
    stats = data(stats_event)
    assert abs(stats["time"] - time.time()) < 5
    assert stats["totals"] == {
        "conversations": 2,
        "by_status": {"streaming": 0, "done": 1, "error": 1, "cancelled": 0},
        "live_turns": 0, "subscribers": 4, "firehose_subscribers": 1,
        "events_per_second": stats["totals"]["events_per_second"],
        "deliveries_per_second": stats["totals"]["deliveries_per_second"],
    }
    assert stats["totals"]["events_per_second"] > 0
    assert sorted(stats["conversations"], key=lambda row: row["conversation"] != a) == [
        {"conversation": a, "subscribers": 3}, {"conversation": b, "subscribers": 1},
    ]
    # Nothing changed since: no new stats event.
    viewers[0].close()
    await eventually(lambda: chorus.registry.get(a).log.subscriber_count == 2)
    firehose.publish_stats()
    rows = data(await stream.next_event())["conversations"]
    assert rows == [{"conversation": a, "subscribers": 2}]  # only what changed
    last_id = stream.events[-1].id
    assert last_id == "9"

    # The table the stream builds equals the server's own snapshot.
    table: dict[str, dict[str, Any]] = {}
    for event in stream.events:
        table = fold(table, event)
    fresh = await events_stream(chorus, "all=1")
    snapshot_event = await fresh.next_event()
    assert (snapshot_event.event, snapshot_event.id) == ("snapshot", "9")
    snapshot = data(snapshot_event)
    assert snapshot["seq"] == 9
    assert {row["conversation"]: row for row in snapshot["conversations"]} == table
    assert table[a]["status"] == "done" and table[b]["status"] == "error"
    assert table[b]["error"] == {"code": "upstream_error", "message": error["message"]}
    assert snapshot["totals"] == data(stream.events[-1])["totals"]
    fresh.close()

    # Resume: away while A is deleted; back with Last-Event-ID, exactly what was missed.
    stream.close()
    await chorus.client.delete(f"/v1/conversations/{a}")
    assert firehose.table.rows.keys() == {b}
    assert last_id is not None
    resumed = await events_stream(chorus, "all=1", {"Last-Event-ID": last_id})
    event = await resumed.next_event()
    assert (event.event, event.id, data(event)) == (
        "conversation_ended", "10", {"conversation": a, "reason": "deleted"}
    )
    resumed.close()
    for viewer in viewers:
        viewer.close()
    combined.close()


async def test_firehose_resume_past_its_buffer_gets_a_snapshot(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    chorus = await start_chorus(hub={"buffer_events": 3})
    fake_upstream.enqueue(answer_script(["one"]), answer_script(["two"]))
    first = (await chorus.create())["id"]
    firehose = chorus.app[FIREHOSE]
    await eventually(lambda: firehose.log.last_seq == 4)
    second = (await chorus.create())["id"]
    await eventually(lambda: firehose.log.last_seq == 8)
    await chorus.client.delete(f"/v1/conversations/{first}")
    stream = await events_stream(chorus, "all=1", {"Last-Event-ID": "2"})
    event = await stream.next_event()
    assert (event.event, event.id) == ("snapshot", "9")
    snapshot = data(event)
    assert [row["conversation"] for row in snapshot["conversations"]] == [second]
    assert snapshot["conversations"][0]["status"] == "done"
    assert snapshot["conversations"][0]["tokens"] == 5
    # From the live edge on: `?live=1` has no snapshot.
    live = await events_stream(chorus, "all=1&live=1")
    await chorus.client.delete(f"/v1/conversations/{second}")
    for reader in (stream, live):
        event = await reader.next_event()
        assert (event.event, event.id, data(event)["reason"]) == (
            "conversation_ended", "10", "deleted"
        )
    stream.close()
    live.close()


async def test_stats_while_a_turn_streams(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, held: list[asyncio.Event]
) -> None:
    chorus = await start_chorus()
    firehose = chorus.app[FIREHOSE]
    a, gates = await create_gated(chorus, fake_upstream, "A", ["abcdefgh", "ij", "k"], held)
    gates[0].set()
    gates[1].set()
    log = chorus.registry.get(a).log
    await eventually(lambda: log.last_seq == 3)
    stream = await events_stream(chorus, "all=1&live=1")
    assert firehose.publish_stats() is not None
    stats = data(await stream.next_event())
    assert stats["totals"]["by_status"]["streaming"] == 1
    assert stats["totals"]["live_turns"] == 1
    (row,) = stats["conversations"]
    rate = row.pop("tokens_per_second")
    assert row == {
        "conversation": a, "subscribers": 0, "chunks": 2, "tokens": 3,  # 10 chars / 4
        "tokens_estimated": True,
    }
    assert rate is None or rate > 0
    stream.close()


async def test_periodic_stats_task_and_shutdown(
    fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's one stats task publishes on its own; on shutdown the combined stream and
    the firehose end with `end` "shutdown" and a retry hint, and the task is gone."""
    monkeypatch.setattr("server.app.STATS_SECONDS", 0.02)
    app = create_app(
        make_settings(fake_upstream.url, server={"shutdown_grace_seconds": 0.5})
    )
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    try:
        assert [t.get_name() for t in asyncio.all_tasks() if t.get_name() == "firehose-stats"]
        fake_upstream.enqueue(Script([WaitFor(asyncio.Event())]))
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"{base}/v1/conversations", json={"messages": [{"role": "user", "content": "x"}]}
            )
            a = (await response.json())["id"]
            firehose = EventStream(await session.get(f"{base}/v1/events?all=1&live=1"))
            combined = EventStream(await session.get(f"{base}/v1/events?conversations={a}"))
            await combined.next_event()
            stats = await firehose.until(lambda e: e.event == "stats")
            assert data(stats[-1])["totals"]["subscribers"] == 1
            started = time.monotonic()
            await runner.cleanup()
            assert time.monotonic() - started < 5
            combined_events = await combined.until_closed()
            # As on a conversation's own stream, the subscriber is ended before the turn
            # is cancelled (its `error` comes after, to nobody).
            assert [(e.event, data(e)) for e in combined_events[-2:]] == [
                ("conversation_end", {"conversation": a, "reason": "shutdown"}),
                ("end", {"reason": "shutdown"}),
            ]
            assert combined_events[-1].retry == 2000
            firehose_events = await firehose.until_closed()
            assert [e.event for e in firehose_events if e.event != "stats"][-3:] == [
                "turn_error", "conversation_ended", "end"
            ]
            assert data(firehose_events[-1]) == {"reason": "shutdown"}
            assert firehose_events[-1].retry == 2000
    finally:
        await runner.cleanup()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "firehose-stats"]


# --- the codec, without sockets -------------------------------------------------------------


def test_parse_ids_and_positions() -> None:
    assert parse_conversation_ids("a, b ,c_-1") == ["a", "b", "c_-1"]
    for bad in ("", " ", "a,", "a,a", "a b", "é", ",".join("x" * 65 for _ in range(1))):
        with pytest.raises(InvalidIds):
            parse_conversation_ids(bad)
    assert parse_position("12.0.x", 3) == [12, 0, None]
    assert parse_position(" 7 ", 1) == [7]
    for bad, count in (("1.2", 3), ("", 1), ("1..2", 3), ("+1", 1), ("x1", 1), ("1" * 20, 1),
                       ("١", 1), ("X", 1)):
        with pytest.raises(InvalidPosition):
            parse_position(bad, count)


def test_retag_splices_the_conversation_into_each_frame() -> None:
    mux = Multiplexer(["aa", "bb"], [0, 4])
    frames = (
        b'id: 1\nevent: turn\ndata: {"turn":0,"model":"m"}\n\n'
        b'id: 2\nevent: answer\ndata: {"turn":0,"choice":0,"content":"a\\n\\nb"}\n\n'
    )
    assert mux.retag(0, frames) == (
        b'id: 1.4\nevent: turn\ndata: {"conversation":"aa","seq":1,"turn":0,"model":"m"}\n\n'
        b'id: 2.4\nevent: answer\ndata: {"conversation":"aa","seq":2,"turn":0,"choice":0,'
        b'"content":"a\\n\\nb"}\n\n'
    )
    assert mux.retag(1, b'id: 9\nevent: snapshot\ndata: {"seq":9,"turns":[]}\n\n') == (
        b'id: 2.9\nevent: snapshot\ndata: {"conversation":"bb","seq":9,"turns":[]}\n\n'
    )
    assert mux.retag(0, b'id: 3\nevent: x\ndata: {}\n\n') == (
        b'id: 3.9\nevent: x\ndata: {"conversation":"aa","seq":3}\n\n'
    )
    assert mux.retag(0, b'retry: 1500\nevent: end\ndata: {"reason":"shutdown"}\n\n') == (
        b'id: x.9\nevent: conversation_end\ndata: {"conversation":"aa","reason":"shutdown"}\n\n'
    )
    assert not mux.all_ended
    with pytest.raises(RuntimeError):
        mux.end_frame()
    assert mux.retag(1, b'event: end\ndata: {"reason":"deleted"}\n\n').startswith(b"id: x.x\n")
    assert mux.all_ended
    assert mux.end_frame() == b'event: end\ndata: {"reason":"deleted"}\n\n'
    with pytest.raises(RuntimeError):
        mux.retag(0, b'id: 4\nevent: answer\ndata: {}\n\n')


def test_the_last_end_carries_its_retry_hint() -> None:
    mux = Multiplexer(["aa"], [0])
    mux.retag(0, b'retry: 1500\nevent: end\ndata: {"reason":"shutdown"}\n\n')
    assert mux.end_frame() == b'retry: 1500\nevent: end\ndata: {"reason":"shutdown"}\n\n'


@pytest.mark.parametrize(
    "frames",
    [b"event: answer\n\n", b"id: 1\ndata: {}\n\n", b": ping\n\n", b"id: 1\nevent: a\ndata: []\n\n"],
)
def test_split_frames_refuses_what_the_hub_does_not_write(frames: bytes) -> None:
    with pytest.raises(ValueError):
        split_frames(frames)
