"""The HTTP API over real sockets: errors, create, follow-ups, state, SSE, lifecycle, bounds."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from server import __version__
from server.app import create_app

from .conftest import (
    Chorus,
    EventStream,
    StartChorus,
    answer_text,
    eventually,
    make_settings,
    payloads,
    upstream_tasks,
)
from .fake_upstream import (
    DONE,
    FakeUpstream,
    Script,
    Send,
    Step,
    WaitFor,
    answer_script,
    chunk,
    sse,
    usage_chunk,
)

USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
HELLO = [{"role": "user", "content": "hello"}]
LOG_KINDS = {"turn", "answer", "done", "error"}
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
UNKNOWN_ID = "AAAAAAAAAAAAAAAAAAAAAAAA"


def gated_script(gate: asyncio.Event, before: list[str], after: list[str]) -> Script:
    """An answer whose `before` pieces go out at once and whose `after` pieces wait for `gate`."""
    script = answer_script([*before, *after])
    script.steps.insert(1 + len(before), WaitFor(gate))
    return script


async def expect_error(
    response: ClientResponse, status: int, code: str, message: str | None = None
) -> dict[str, Any]:
    """Assert the JSON error shape; return the error object."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json", text
    body = orjson.loads(text)
    assert list(body) == ["error"], body
    error: dict[str, Any] = body["error"]
    assert sorted(error) == ["code", "message"], body
    assert error["code"] == code, body
    assert isinstance(error["message"], str) and error["message"], body
    if message is not None:
        assert error["message"] == message
    return error


async def wait_done(chorus: Chorus, conversation_id: str, turn: int = 0) -> dict[str, Any]:
    """Poll GET state until `turn` has ended; return the state."""
    async with asyncio.timeout(10):
        while True:
            state = await chorus.state(conversation_id)
            if len(state["turns"]) > turn and state["status"] != "streaming":
                return state
            await asyncio.sleep(0.005)


def frames(raw: bytes) -> list[bytes]:
    """The raw SSE frames (blank-line separated) of a stream written by Chorus."""
    parts = bytes(raw).split(b"\n\n")
    assert parts[-1] == b"", raw[-200:]
    return parts[:-1]


# --- bad requests --------------------------------------------------------------------------

# (method, path, body, status, code). `{id}` is an existing conversation's id; a body of
# bytes is sent as is, anything else as JSON.
BAD_REQUESTS: list[tuple[str, str, Any, int, str]] = [
    ("POST", "/v1/conversations", b"{not json", 400, "invalid_json"),
    ("POST", "/v1/conversations", b'{"messages": [}', 400, "invalid_json"),
    ("POST", "/v1/conversations", b"", 400, "invalid_json"),
    ("POST", "/v1/conversations", b"  \r\n\t ", 400, "invalid_json"),
    ("POST", "/v1/conversations", b"\xff\xfe", 400, "invalid_json"),
    ("POST", "/v1/conversations", [HELLO[0]], 400, "invalid_body"),
    ("POST", "/v1/conversations", "hello", 400, "invalid_body"),
    ("POST", "/v1/conversations", 42, 400, "invalid_body"),
    ("POST", "/v1/conversations", None, 400, "invalid_body"),
    ("POST", "/v1/conversations", {}, 400, "invalid_messages"),
    ("POST", "/v1/conversations", {"messages": []}, 400, "invalid_messages"),
    ("POST", "/v1/conversations", {"messages": None}, 400, "invalid_messages"),
    ("POST", "/v1/conversations", {"messages": "hello"}, 400, "invalid_messages"),
    ("POST", "/v1/conversations", {"messages": HELLO[0]}, 400, "invalid_messages"),
    ("POST", "/v1/conversations", {"messages": ["hello"]}, 400, "invalid_messages"),
    ("POST", "/v1/conversations", {"messages": [{"content": "hi"}]}, 400, "invalid_messages"),
    ("POST", "/v1/conversations", {"messages": [{"role": "robot", "content": "hi"}]}, 400,
     "invalid_messages"),
    ("POST", "/v1/conversations", {"messages": [{"role": 1, "content": "hi"}]}, 400,
     "invalid_messages"),
    ("POST", "/v1/conversations", {"messages": [{"role": "user"}]}, 400, "invalid_messages"),
    ("POST", "/v1/conversations", {"messages": [{"role": "user", "content": 3}]}, 400,
     "invalid_messages"),
    ("POST", "/v1/conversations", {"messages": [*HELLO, {"role": "USER", "content": "x"}]}, 400,
     "invalid_messages"),
    ("POST", "/v1/conversations", {"messages": HELLO, "n": 0}, 400, "invalid_n"),
    ("POST", "/v1/conversations", {"messages": HELLO, "n": 9}, 400, "invalid_n"),
    ("POST", "/v1/conversations", {"messages": HELLO, "n": -1}, 400, "invalid_n"),
    ("POST", "/v1/conversations", {"messages": HELLO, "n": "2"}, 400, "invalid_n"),
    ("POST", "/v1/conversations", {"messages": HELLO, "n": 1.5}, 400, "invalid_n"),
    ("POST", "/v1/conversations", {"messages": HELLO, "n": True}, 400, "invalid_n"),
    ("POST", "/v1/conversations", {"messages": HELLO, "model": ""}, 400, "invalid_model"),
    ("POST", "/v1/conversations", {"messages": HELLO, "model": 7}, 400, "invalid_model"),
    ("POST", "/v1/conversations/{id}/messages", b"nope", 400, "invalid_json"),
    ("POST", "/v1/conversations/{id}/messages", b"", 400, "invalid_json"),
    ("POST", "/v1/conversations/{id}/messages", ["hi"], 400, "invalid_body"),
    ("POST", "/v1/conversations/{id}/messages", {}, 400, "invalid_content"),
    ("POST", "/v1/conversations/{id}/messages", {"content": ""}, 400, "invalid_content"),
    ("POST", "/v1/conversations/{id}/messages", {"content": 5}, 400, "invalid_content"),
    ("POST", "/v1/conversations/{id}/messages", {"content": None}, 400, "invalid_content"),
    ("GET", "/v1/conversations/{id}/events?after=abc", None, 400, "invalid_after"),
    ("GET", "/v1/conversations/{id}/events?live=maybe", None, 400, "invalid_live"),
    ("GET", f"/v1/conversations/{UNKNOWN_ID}", None, 404, "conversation_not_found"),
    ("GET", f"/v1/conversations/{UNKNOWN_ID}/events", None, 404, "conversation_not_found"),
    ("POST", f"/v1/conversations/{UNKNOWN_ID}/messages", {"content": "hi"}, 404,
     "conversation_not_found"),
    ("POST", f"/v1/conversations/{UNKNOWN_ID}/cancel", None, 404, "conversation_not_found"),
    ("DELETE", f"/v1/conversations/{UNKNOWN_ID}", None, 404, "conversation_not_found"),
    ("GET", "/v1/conversations/not!an!id", None, 404, "conversation_not_found"),
    ("GET", "/v1/conversations/" + "a" * 65, None, 404, "conversation_not_found"),
    ("DELETE", "/v1/conversations/not!an!id", None, 404, "conversation_not_found"),
    ("GET", "/v1/nope", None, 404, "not_found"),
    ("GET", "/v1/conversations/{id}/nope", None, 404, "not_found"),
    ("PUT", "/v1/conversations", {"messages": HELLO}, 405, "method_not_allowed"),
    ("PATCH", "/v1/conversations/{id}", {}, 405, "method_not_allowed"),
    ("GET", "/v1/conversations/{id}/messages", None, 405, "method_not_allowed"),
    ("DELETE", "/healthz", None, 405, "method_not_allowed"),
]


async def send(chorus: Chorus, method: str, path: str, body: Any) -> ClientResponse:
    if isinstance(body, bytes):
        return await chorus.client.request(method, path, data=body)
    if body is None and method != "POST":
        return await chorus.client.request(method, path)
    return await chorus.client.request(
        method, path, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
    )


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    BAD_REQUESTS,
    ids=[f"{m} {p} {b!r:.40}" for m, p, b, _, _ in BAD_REQUESTS],
)
async def test_bad_request_gets_json_error(
    start_chorus: StartChorus,
    fake_upstream: FakeUpstream,
    method: str,
    path: str,
    body: Any,
    status: int,
    code: str,
) -> None:
    fake_upstream.enqueue(answer_script(["fine"]))
    chorus = await start_chorus()
    created = await chorus.create()
    await wait_done(chorus, created["id"])

    response = await send(chorus, method, path.format(id=created["id"]), body)
    await expect_error(response, status, code)
    assert fake_upstream.calls == 1
    assert [c.id for c in chorus.registry.all()] == [created["id"]]


async def test_method_not_allowed_says_which_are(start_chorus: StartChorus) -> None:
    chorus = await start_chorus()
    response = await chorus.client.put("/v1/conversations", data=b"{}")
    await expect_error(response, 405, "method_not_allowed")
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}
    response = await chorus.client.get("/v1/nowhere")
    await expect_error(response, 404, "not_found", "no such route")


async def test_bad_requests_leave_a_streaming_conversation_alone(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(gated_script(gate, ["Hello"], [", ", "world", "!"]))
    chorus = await start_chorus()
    created = await chorus.create()
    subscriber = await chorus.subscribe(created["id"])
    await subscriber.until(lambda e: e.event == "answer")

    for method, path, body, status, code in BAD_REQUESTS:
        response = await send(chorus, method, path.format(id=created["id"]), body)
        await expect_error(response, status, code)

    state = await chorus.state(created["id"])
    assert state["status"] == "streaming"
    assert state["subscribers"] == 1
    assert [c.id for c in chorus.registry.all()] == [created["id"]]
    gate.set()
    events = await subscriber.until_turn_ends()
    assert answer_text(events) == "Hello, world!"
    assert [e.event for e in events] == ["turn"] + ["answer"] * 4 + ["done"]
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert fake_upstream.calls == 1
    await eventually(lambda: not upstream_tasks())


# --- body size ------------------------------------------------------------------------------


def body_of_size(size: int) -> bytes:
    """A valid create body of exactly `size` bytes."""
    empty = orjson.dumps({"messages": [{"role": "user", "content": ""}]})
    body = orjson.dumps({"messages": [{"role": "user", "content": "x" * (size - len(empty))}]})
    assert len(body) == size
    return body


async def chunked(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 100):
        yield body[start : start + 100]


async def test_body_size_limit_with_content_length(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["ok"]))
    chorus = await start_chorus(server={"max_body_bytes": 1000})
    response = await chorus.client.post("/v1/conversations", data=body_of_size(1001))
    assert response.request_info.headers["Content-Length"] == "1001"
    await expect_error(response, 413, "body_too_large")
    response = await chorus.client.post("/v1/conversations", data=body_of_size(50_000))
    await expect_error(response, 413, "body_too_large")
    assert fake_upstream.calls == 0

    response = await chorus.client.post("/v1/conversations", data=body_of_size(1000))
    assert response.status == 201, await response.text()
    await wait_done(chorus, (await response.json())["id"])


async def test_body_size_limit_with_chunked_body(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["ok"]))
    chorus = await start_chorus(server={"max_body_bytes": 1000})
    response = await chorus.client.post("/v1/conversations", data=chunked(body_of_size(1001)))
    assert response.request_info.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in response.request_info.headers
    await expect_error(response, 413, "body_too_large")
    response = await chorus.client.post("/v1/conversations", data=chunked(body_of_size(20_000)))
    await expect_error(response, 413, "body_too_large")
    assert fake_upstream.calls == 0

    response = await chorus.client.post("/v1/conversations", data=chunked(body_of_size(1000)))
    assert response.status == 201, await response.text()
    await wait_done(chorus, (await response.json())["id"])


# --- create ---------------------------------------------------------------------------------


async def test_create_answers_201_with_a_long_random_id(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["a"]), answer_script(["b"]))
    chorus = await start_chorus()
    responses = [
        await chorus.client.post("/v1/conversations", json={"messages": HELLO}) for _ in range(2)
    ]
    bodies = []
    for response in responses:
        assert response.status == 201
        assert response.content_type == "application/json"
        body = await response.json()
        assert sorted(body) == [
            "events_url", "id", "status", "watch_token", "watch_token_expires_at"
        ]
        assert ID_PATTERN.fullmatch(body["id"])
        assert len(body["id"]) >= 22  # >= 128 bits of URL-safe base64
        assert body["events_url"] == f"/v1/conversations/{body['id']}/events"
        assert body["status"] == "streaming"
        bodies.append(body)
    assert bodies[0]["id"] != bodies[1]["id"]
    for body in bodies:
        await wait_done(chorus, body["id"])


async def test_model_defaults_from_config_and_a_given_model_goes_upstream(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["a"]), answer_script(["b"]), answer_script(["c"]))
    chorus = await start_chorus(upstream={"model": "configured-model"})
    first = await chorus.create()
    second = await chorus.create(model="client-model")
    third = await chorus.create(model=None)
    for created in (first, second, third):
        await wait_done(chorus, created["id"])
    assert [r["model"] for r in fake_upstream.requests] == [
        "configured-model", "client-model", "configured-model",
    ]
    assert (await chorus.state(first["id"]))["model"] == "configured-model"
    assert (await chorus.state(second["id"]))["model"] == "client-model"


async def test_client_cannot_turn_streaming_off(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["a"]))
    chorus = await start_chorus()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    created = await chorus.create(
        messages=messages,
        stream=False,
        stream_options={"include_usage": False},
        temperature=0.25,
        user="someone",
    )
    await wait_done(chorus, created["id"])
    assert fake_upstream.requests == [
        {
            "model": "test-model",
            "messages": messages,
            "temperature": 0.25,
            "user": "someone",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ]


# --- follow-ups -----------------------------------------------------------------------------


async def test_follow_up_streams_turn_one_on_the_same_stream(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(
        answer_script(["The answer", " is 42."]),
        gated_script(gate, ["Because"], [" I said so."]),
    )
    chorus = await start_chorus()
    messages = [{"role": "system", "content": "terse"}, {"role": "user", "content": "why?"}]
    created = await chorus.create(messages=messages, temperature=0)
    cid = created["id"]
    subscriber = await chorus.subscribe(cid)
    await subscriber.until_turn_ends(0)

    response = await chorus.client.post(
        f"/v1/conversations/{cid}/messages", json={"content": "really?"}
    )
    assert response.status == 202, await response.text()
    assert await response.json() == {
        "id": cid, "events_url": f"/v1/conversations/{cid}/events", "status": "streaming",
        "turn": 1,
    }
    await subscriber.until(lambda e: e.event == "answer" and "turn\":1" in e.data)

    # A follow-up while turn 1 streams is refused, and is not recorded.
    response = await chorus.client.post(
        f"/v1/conversations/{cid}/messages", json={"content": "hello??"}
    )
    await expect_error(response, 409, "turn_in_progress")
    response = await chorus.client.post(f"/v1/conversations/{cid}/messages", json={"content": 1})
    await expect_error(response, 400, "invalid_content")

    gate.set()
    events = await subscriber.until_turn_ends(1)
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert [(e.event, orjson.loads(e.data)["turn"]) for e in events] == [
        ("turn", 0), ("answer", 0), ("answer", 0), ("done", 0),
        ("turn", 1), ("answer", 1), ("answer", 1), ("done", 1),
    ]
    assert answer_text(events, turn=0) == "The answer is 42."
    assert answer_text(events, turn=1) == "Because I said so."
    assert fake_upstream.calls == 2
    assert fake_upstream.requests[1] == {
        "model": "test-model",
        "temperature": 0,
        "messages": [
            *messages,
            {"role": "assistant", "content": "The answer is 42."},
            {"role": "user", "content": "really?"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    state = await wait_done(chorus, cid, turn=1)
    assert state["messages"] == [*messages, {"role": "user", "content": "really?"}]
    assert [t["status"] for t in state["turns"]] == ["done", "done"]
    assert state["last_seq"] == len(events)
    await eventually(lambda: not upstream_tasks())


async def test_follow_up_during_turn_zero_is_409(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(gated_script(gate, ["a"], ["b"]))
    chorus = await start_chorus()
    created = await chorus.create()
    response = await chorus.client.post(
        f"/v1/conversations/{created['id']}/messages", json={"content": "more"}
    )
    await expect_error(response, 409, "turn_in_progress")
    gate.set()
    state = await wait_done(chorus, created["id"])
    assert len(state["turns"]) == 1
    assert state["messages"] == HELLO
    assert fake_upstream.calls == 1


# --- state and listing ----------------------------------------------------------------------


async def test_state_reports_turns_choices_and_live_subscriber_count(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    tool_call = {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": "lookup", "arguments": '{"q":'}}
    steps: list[Step] = [
        Send(sse(chunk(role="assistant", content=""))),
        Send(sse(chunk(content="Hello"))),
        Send(sse(chunk(index=1, refusal="I can't"))),
        WaitFor(gate),
        Send(sse(chunk(content=" world"))),
        Send(sse(chunk(index=1, refusal=" help."))),
        Send(sse(chunk(index=2, tool_calls=[tool_call]))),
        Send(sse(chunk(index=2, tool_calls=[{"index": 0, "function": {"arguments": '"x"}'}}]))),
        Send(sse(chunk(finish_reason="stop"))),
        Send(sse(chunk(index=1, finish_reason="stop"))),
        Send(sse(chunk(index=2, finish_reason="tool_calls"))),
        Send(sse(usage_chunk())),
        Send(DONE),
    ]
    fake_upstream.enqueue(Script(steps))
    chorus = await start_chorus()
    created = await chorus.create(n=3)
    cid = created["id"]
    log = chorus.registry.get(cid).log

    state = await chorus.state(cid)
    assert state["subscribers"] == 0
    subscribers = [await chorus.subscribe(cid) for _ in range(2)]
    await eventually(lambda: log.subscriber_count == 2)
    await subscribers[0].until(lambda e: e.event == "answer" and '"choice":1' in e.data)
    state = await chorus.state(cid)
    assert state["subscribers"] == 2
    assert state["status"] == "streaming"
    assert state["turns"][0]["status"] == "streaming"
    assert state["turns"][0]["choices"][0]["content"] == "Hello"

    gate.set()
    events = await subscribers[1].until_turn_ends()
    for subscriber in subscribers:
        subscriber.close()
    await eventually(lambda: log.subscriber_count == 0)

    state = await chorus.state(cid)
    created_at = state.pop("created_at")
    assert isinstance(created_at, float) and abs(created_at - time.time()) < 60
    assert state == {
        "id": cid,
        "status": "done",
        "model": "test-model",
        "turns": [
            {
                "turn": 0,
                "status": "done",
                "model": "test-model",
                "usage": USAGE,
                "choices": [
                    {"choice": 0, "content": "Hello world", "tool_calls": None,
                     "refusal": None, "finish_reason": "stop"},
                    {"choice": 1, "content": "", "tool_calls": None,
                     "refusal": "I can't help.", "finish_reason": "stop"},
                    {"choice": 2, "content": "",
                     "tool_calls": [{**tool_call, "function": {"name": "lookup",
                                                               "arguments": '{"q":"x"}'}}],
                     "refusal": None, "finish_reason": "tool_calls"},
                ],
            }
        ],
        "subscribers": 0,
        "last_seq": int(events[-1].id or 0),
        "messages": HELLO,
    }
    assert state["last_seq"] == len(events)


async def test_list_conversations(start_chorus: StartChorus, fake_upstream: FakeUpstream) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(answer_script(["one"]), gated_script(gate, ["two"], []))
    chorus = await start_chorus()
    response = await chorus.client.get("/v1/conversations")
    assert response.status == 200
    assert await response.json() == {"conversations": []}

    first = await chorus.create()
    await wait_done(chorus, first["id"])
    second = await chorus.create(model="other")
    subscriber = await chorus.subscribe(second["id"])
    await subscriber.until(lambda e: e.event == "answer")

    response = await chorus.client.get("/v1/conversations")
    listed = (await response.json())["conversations"]
    for entry in listed:
        assert isinstance(entry.pop("created_at"), float)
    assert listed == [
        {"id": first["id"], "status": "done", "model": "test-model", "turns": 1,
         "subscribers": 0, "last_seq": 3},
        {"id": second["id"], "status": "streaming", "model": "other", "turns": 1,
         "subscribers": 1, "last_seq": 2},
    ]
    gate.set()
    await subscriber.until_turn_ends()
    await eventually(lambda: not upstream_tasks())


# --- SSE ------------------------------------------------------------------------------------


async def test_sse_framing_retry_hint_and_ids(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["Hi", " there", "."]))
    chorus = await start_chorus(hub={"retry_hint_ms": 1234})
    created = await chorus.create()
    subscriber = await chorus.subscribe(created["id"])
    assert subscriber.status == 200
    assert subscriber.response.headers["Content-Type"] == "text/event-stream"
    assert subscriber.response.headers["Cache-Control"] == "no-cache"
    await subscriber.until_turn_ends()
    response = await chorus.client.delete(f"/v1/conversations/{created['id']}")
    assert response.status == 204
    await subscriber.until_closed()

    raw = bytes(subscriber.raw)
    assert raw.startswith(b"retry: 1234\n\n")
    log_frames = frames(raw)[1:]
    assert log_frames[-1] == b'event: end\ndata: {"reason":"deleted"}'
    for seq, frame in enumerate(log_frames[:-1], start=1):
        lines = frame.split(b"\n")
        assert lines[0] == b"id: %d" % seq
        assert lines[1].removeprefix(b"event: ").decode() in LOG_KINDS
        assert lines[2].startswith(b"data: {")
        assert len(lines) == 3
    assert [e.event for e in subscriber.events] == ["turn", "answer", "answer", "answer", "done",
                                                    "end"]


@pytest.mark.parametrize(
    "header", ["abc", "-1", "1.5", "+1", "0x1", "1e3", "1 2", "99999999999999999999"]
)
async def test_malformed_last_event_id_is_400(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, header: str
) -> None:
    fake_upstream.enqueue(answer_script(["a"]))
    chorus = await start_chorus()
    created = await chorus.create()
    await wait_done(chorus, created["id"])
    response = await chorus.client.get(
        created["events_url"], headers={"Last-Event-ID": header}
    )
    await expect_error(response, 400, "invalid_last_event_id")
    response = await chorus.client.get(created["events_url"], params={"after": header})
    await expect_error(response, 400, "invalid_after")
    assert chorus.registry.get(created["id"]).log.subscriber_count == 0


async def test_resume_positions(start_chorus: StartChorus, fake_upstream: FakeUpstream) -> None:
    fake_upstream.enqueue(answer_script(["a", "b", "c"]))
    chorus = await start_chorus()
    created = await chorus.create()
    cid = created["id"]
    state = await wait_done(chorus, cid)
    last = state["last_seq"]
    assert last == 5

    # Beyond the last event: refused, for the header and for ?after.
    response = await chorus.client.get(created["events_url"], headers={"Last-Event-ID": "6"})
    await expect_error(response, 400, "invalid_last_event_id")
    response = await chorus.client.get(created["events_url"] + "?after=6")
    await expect_error(response, 400, "invalid_after")
    response = await chorus.client.get(created["events_url"] + "?after=")
    await expect_error(response, 400, "invalid_after")

    # The header wins over ?after, even a malformed one...
    subscriber = await chorus.subscribe(
        cid, headers={"Last-Event-ID": "3"}, query="?after=abc"
    )
    assert subscriber.status == 200
    # ...and a malformed header is not rescued by a good ?after.
    response = await chorus.client.get(
        created["events_url"] + "?after=1", headers={"Last-Event-ID": "x"}
    )
    await expect_error(response, 400, "invalid_last_event_id")

    by_after = await chorus.subscribe(cid, query="?after=1")
    at_end = await chorus.subscribe(cid, headers={"Last-Event-ID": str(last)})
    live = await chorus.subscribe(cid, query="?live=1")
    await eventually(lambda: chorus.registry.get(cid).log.subscriber_count == 4)
    await chorus.client.delete(f"/v1/conversations/{cid}")
    assert [e.id for e in await subscriber.until_closed()] == ["4", "5", "5"]
    assert [e.id for e in await by_after.until_closed()] == ["2", "3", "4", "5", "5"]
    for stream in (at_end, live):
        assert [e.event for e in await stream.until_closed()] == ["end"]
        assert bytes(stream.raw) == b'retry: 2000\n\nevent: end\ndata: {"reason":"deleted"}\n\n'


async def test_live_subscriber_gets_only_new_events(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(gated_script(gate, ["early"], ["late", "r"]))
    chorus = await start_chorus()
    created = await chorus.create()
    cid = created["id"]
    replaying = await chorus.subscribe(cid)
    seen = await replaying.until(lambda e: e.event == "answer")
    early_seq = int(seen[-1].id or 0)
    assert chorus.registry.get(cid).log.last_seq == early_seq

    live = await chorus.subscribe(cid, query="?live=1")
    await eventually(lambda: chorus.registry.get(cid).log.subscriber_count == 2)
    gate.set()
    events = await live.until_turn_ends()
    assert [e.event for e in events] == ["answer", "answer", "done"]
    assert [e.id for e in events] == [str(early_seq + i) for i in (1, 2, 3)]
    assert answer_text(events) == "later"
    assert answer_text(await replaying.until_turn_ends()) == "earlylater"


# --- lifecycle: delete, retention, eviction -------------------------------------------------


async def test_delete_while_streaming_ends_streams_and_upstream(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(gated_script(gate, ["partial"], ["never"]))
    chorus = await start_chorus()
    created = await chorus.create()
    cid = created["id"]
    subscribers = [await chorus.subscribe(cid) for _ in range(2)]
    for subscriber in subscribers:
        await subscriber.until(lambda e: e.event == "answer")
    assert fake_upstream.active == 1
    assert len(upstream_tasks()) == 1

    response = await chorus.client.delete(f"/v1/conversations/{cid}")
    assert response.status == 204
    assert upstream_tasks() == []
    for subscriber in subscribers:
        events = await subscriber.until_closed()
        assert subscriber.eof
        assert [e.event for e in events] == ["turn", "answer", "error", "end"]
        error = payloads(events, "error")[0]
        assert (error["turn"], error["code"]) == (0, "cancelled")
        assert payloads(events, "end") == [{"reason": "deleted"}]
    await expect_error(await chorus.client.get(f"/v1/conversations/{cid}"), 404,
                       "conversation_not_found")
    await expect_error(await chorus.client.get(f"/v1/conversations/{cid}/events"), 404,
                       "conversation_not_found")
    await expect_error(await chorus.client.delete(f"/v1/conversations/{cid}"), 404,
                       "conversation_not_found")
    await eventually(lambda: fake_upstream.active == 0)
    assert fake_upstream.calls == 1
    assert len(chorus.registry) == 0


async def test_cancel_ends_the_turn_but_keeps_the_conversation(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(gated_script(gate, ["partial"], ["never"]))
    chorus = await start_chorus()
    created = await chorus.create()
    cid = created["id"]
    subscriber = await chorus.subscribe(cid)
    await subscriber.until(lambda e: e.event == "answer")
    response = await chorus.client.post(f"/v1/conversations/{cid}/cancel")
    assert response.status == 202
    assert await response.json() == {"id": cid, "status": "cancelled"}
    events = await subscriber.until_turn_ends()
    assert payloads(events, "error")[0]["code"] == "cancelled"
    await expect_error(
        await chorus.client.post(f"/v1/conversations/{cid}/cancel"), 409, "not_streaming"
    )
    assert (await chorus.state(cid))["status"] == "cancelled"
    assert upstream_tasks() == []
    await eventually(lambda: fake_upstream.active == 0)


async def test_finished_conversation_expires_after_retention(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["short"]))
    chorus = await start_chorus(hub={"retention_seconds": 0.2})
    created = await chorus.create()
    cid = created["id"]
    subscriber = await chorus.subscribe(cid)
    await subscriber.until_turn_ends()
    assert (await chorus.state(cid))["status"] == "done"
    events = await subscriber.until_closed()
    assert subscriber.eof
    assert [e.event for e in events] == ["turn", "answer", "done", "end"]
    assert payloads(events, "end") == [{"reason": "expired"}]
    await expect_error(await chorus.client.get(f"/v1/conversations/{cid}"), 404,
                       "conversation_not_found")
    assert len(chorus.registry) == 0


async def test_max_conversations_evicts_the_first_finished(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    # The first created finishes last, so "oldest created" and "first finished" differ.
    fake_upstream.enqueue(
        gated_script(gate, ["A"], ["a"]), answer_script(["B"]), answer_script(["C"])
    )
    chorus = await start_chorus(hub={"max_conversations": 2})
    first = await chorus.create()
    second = await chorus.create()
    await wait_done(chorus, second["id"])
    gate.set()
    await wait_done(chorus, first["id"])
    first_sub = await chorus.subscribe(first["id"])
    second_sub = await chorus.subscribe(second["id"])
    await eventually(lambda: sum(c.log.subscriber_count for c in chorus.registry.all()) == 2)

    third = await chorus.create()
    events = await second_sub.until_closed()
    assert payloads(events, "end") == [{"reason": "evicted"}]
    await expect_error(await chorus.client.get(f"/v1/conversations/{second['id']}"), 404,
                       "conversation_not_found")
    assert [c.id for c in chorus.registry.all()] == [first["id"], third["id"]]
    assert (await chorus.state(first["id"]))["subscribers"] == 1
    assert not first_sub.eof
    await wait_done(chorus, third["id"])


async def test_max_conversations_all_streaming_is_429(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(
        gated_script(gate, ["A"], []), gated_script(gate, ["B"], []), answer_script(["C"])
    )
    chorus = await start_chorus(hub={"max_conversations": 2})
    first = await chorus.create()
    second = await chorus.create()
    await eventually(lambda: fake_upstream.active == 2)
    response = await chorus.client.post("/v1/conversations", json={"messages": HELLO})
    await expect_error(response, 429, "too_many_conversations")
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    assert [c.id for c in chorus.registry.all()] == [first["id"], second["id"]]
    # Refused before anything started: no third upstream task.
    assert sorted(t.get_name() for t in upstream_tasks()) == sorted(
        [f"upstream:{first['id']}:0", f"upstream:{second['id']}:0"]
    )

    gate.set()
    await wait_done(chorus, first["id"])
    await wait_done(chorus, second["id"])
    third = await chorus.create()
    assert [c.id for c in chorus.registry.all()] == [second["id"], third["id"]]
    await wait_done(chorus, third["id"])


async def test_late_done_callback_of_turn_zero_does_not_finish_turn_one(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    """A follow-up can start between the end of turn 0's task and the registry's done
    callback for it (one loop step later: a follow-up request handled in the same loop
    iteration as the upstream's last bytes). That late callback must not mark the
    conversation finished while turn 1 streams, or it expires or is evicted mid-answer.

    The interleaving cannot be forced through sockets, so the callback is replayed here
    at that point.
    """
    gate = asyncio.Event()
    fake_upstream.enqueue(answer_script(["a"]), gated_script(gate, ["c"], ["d"]))
    chorus = await start_chorus(hub={"max_conversations": 1, "retention_seconds": 0.01})
    created = await chorus.create()
    cid = created["id"]
    conversation = chorus.registry.get(cid)
    subscriber = await chorus.subscribe(cid)
    await subscriber.until_turn_ends(0)
    response = await chorus.client.post(f"/v1/conversations/{cid}/messages",
                                        json={"content": "more"})
    assert response.status == 202
    chorus.registry._turn_finished(conversation)  # turn 0's callback, arriving late

    await subscriber.until(lambda e: e.event == "answer" and '"turn":1' in e.data)
    assert conversation.finished_at is None
    response = await chorus.client.post("/v1/conversations", json={"messages": HELLO})
    await expect_error(response, 429, "too_many_conversations")
    gate.set()
    events = await subscriber.until_turn_ends(1)
    assert answer_text(events, turn=1) == "cd"
    assert payloads(await subscriber.until_closed(), "end") == [{"reason": "expired"}]


# --- small routes ---------------------------------------------------------------------------


async def test_healthz_info_and_page(start_chorus: StartChorus) -> None:
    chorus = await start_chorus()
    response = await chorus.client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}
    response = await chorus.client.get("/v1/info")
    assert response.status == 200
    assert await response.json() == {
        "upstream": {"mock": False, "model": "test-model"}, "version": __version__,
    }
    response = await chorus.client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = Path(__file__).resolve().parent.parent / "web" / "index.html"
    assert await response.read() == page.read_bytes()


async def test_info_says_mock_when_the_embedded_mock_answers(aiohttp_client: Any) -> None:
    settings = make_settings("https://api.openai.com/v1")
    settings = dataclasses.replace(
        settings,
        upstream=dataclasses.replace(settings.upstream, api_key=None),
        mock=dataclasses.replace(settings.mock, chunks_per_second=0),
        use_mock=True,
    )
    client = await aiohttp_client(create_app(settings))
    response = await client.get("/v1/info")
    assert await response.json() == {
        "upstream": {"mock": True, "model": "test-model"}, "version": __version__,
    }
    response = await client.post("/v1/conversations", json={"messages": HELLO})
    assert response.status == 201
    events = await EventStream(
        await client.get((await response.json())["events_url"])
    ).until_turn_ends()
    assert events[-1].event == "done"
    assert answer_text(events) != ""


# --- property: no body gives a 500 ----------------------------------------------------------

ROLES = ["system", "developer", "user", "assistant", "tool", "function"]
# Lone surrogates, NUL and the line separators that JSON allows but SSE and UTF-8 do not.
text = st.text(
    st.characters() | st.sampled_from(["\ud800", "\udfff", "\x00", "\u2028", "\r", "\n"]),
    max_size=12,
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(text, children, max_size=4),
    max_leaves=16,
)
valid_message = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES), "content": st.text(max_size=20)},
    optional={"name": st.text(max_size=8)},
)
# Any field may hold anything, unhashable values included.
odd_field = (
    st.sampled_from(ROLES)
    | st.lists(text, max_size=2)
    | st.dictionaries(text, text, max_size=2)
    | json_values
)
message_like = st.one_of(
    valid_message,
    st.fixed_dictionaries(
        {"role": odd_field}, optional={"content": odd_field, "name": odd_field}
    ),
    st.dictionaries(st.sampled_from(["role", "content", "name", "tool_calls"]), odd_field),
    json_values,
)
messages = st.one_of(
    st.lists(valid_message, min_size=1, max_size=3),
    st.lists(message_like, min_size=1, max_size=3),
    json_values,
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"messages": messages},
        optional={
            "model": text | json_values,
            "n": st.integers(min_value=-1, max_value=9) | json_values,
            "stream": json_values,
            "stream_options": json_values,
            "temperature": json_values,
        },
    ),
    # Anything else the client adds is passed upstream as is.
    st.builds(
        lambda extra, messages: {**extra, "messages": messages},
        st.dictionaries(text, json_values, max_size=4),
        messages,
    ),
)


@pytest.fixture
async def fuzzed_chorus(start_chorus: StartChorus) -> Chorus:
    # No script is queued: every accepted conversation's upstream answers 500 at once, and
    # with no retries its turn ends immediately.
    return await start_chorus(upstream={"max_retries": 0})


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=bodies, ascii_only=st.booleans())
async def test_random_bodies_never_cause_a_500(
    fuzzed_chorus: Chorus, body: Any, ascii_only: bool
) -> None:
    """Random JSON bodies get 201 or a 4xx JSON error, never a 500.

    pytest-asyncio runs an `async def` Hypothesis test's examples on the test's own event
    loop, the one its fixtures use, so one Chorus server (a function-scoped fixture, hence
    the suppressed health check) serves every example. Bodies are encoded by the `json`
    module, which allows integers past 64 bits and lone surrogates (escaped as `\\udXXX`
    when `ascii_only`, else written raw, which is invalid UTF-8).
    """
    chorus = fuzzed_chorus
    data = json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    response = await chorus.client.post(
        "/v1/conversations", data=data, headers={"Content-Type": "application/json"}
    )
    event(f"HTTP {response.status}")
    assert response.content_type == "application/json"
    result = await response.json()
    if response.status == 201:
        assert sorted(result) == [
            "events_url", "id", "status", "watch_token", "watch_token_expires_at"
        ]
        state = await wait_done(chorus, result["id"])
        # The turn failed only because the fake upstream refused it.
        assert state["turns"][0]["error"]["code"] == "upstream_error", state
        await eventually(lambda: not upstream_tasks())
    else:
        assert 400 <= response.status < 500, result
        assert sorted(result["error"]) == ["code", "message"]


async def test_head_on_a_stream_is_refused_without_attaching_anyone(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["hi"]))
    chorus = await start_chorus()
    created = await chorus.create()
    for path in (created["events_url"], "/v1/events?all=1"):
        response = await chorus.client.head(path)
        assert response.status == 405
        assert response.headers["Allow"] == "GET"
    assert chorus.registry.get(created["id"]).log.subscriber_count == 0
