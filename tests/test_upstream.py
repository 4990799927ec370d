"""The upstream client, end to end and in pieces.

End-to-end tests drive a real Chorus against the scripted fake upstream over real sockets:
each creates a conversation, reads its events over SSE, and checks the exact event
sequence, the final state from `GET /v1/conversations/{id}`, what the fake upstream
received, and that no `upstream:` task is left running. Pure tests cover
`parse_retry_after`, `redact` and `parse_chunk`.
"""

from __future__ import annotations

import asyncio
import os
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

import server.upstream
from server.chat_chunks import ChatChunk, ChoiceDelta, parse_chunk
from server.errors import TurnErrorCode, UpstreamFailure
from server.sse import ServerSentEvent, SSEDecoder
from server.upstream import parse_retry_after, redact

from .conftest import Chorus, StartChorus, answer_text, eventually, payloads, upstream_tasks
from .fake_upstream import (
    DONE,
    Cut,
    FakeUpstream,
    Hang,
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

API_KEY = "sk-test-SECRET-key-0123456789"  # tests/conftest.py make_settings
MESSAGES = [{"role": "user", "content": "hello"}]
USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
FAST_TIMEOUTS = {"first_chunk_timeout": 0.3, "idle_timeout": 0.3}
INCOMPLETE = "upstream stream ended before the answer was complete: "


@dataclass
class Turn:
    """One finished turn as a subscriber and the state endpoint saw it."""

    id: str
    events: list[ServerSentEvent]
    raw: bytes
    state: dict[str, Any]
    prompt_chars: int

    @property
    def estimated_usage(self) -> dict[str, Any]:
        """The usage Chorus records when upstream reported none: ~4 characters a token."""
        generated = 0
        for answer in payloads(self.events, "answer"):
            generated += len(answer["content"]) + len(answer.get("refusal", ""))
            for call in answer.get("tool_calls", ()):
                function = call.get("function", {})
                generated += sum(len(v) for v in function.values() if isinstance(v, str))
        prompt, completion = -(-self.prompt_chars // 4), -(-generated // 4)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "estimated": True,
        }

    @property
    def kinds(self) -> list[str]:
        return [event.event for event in self.events]

    @property
    def reported(self) -> dict[str, Any]:
        """The turn as `GET /v1/conversations/{id}` reports it (the only turn)."""
        turns: list[dict[str, Any]] = self.state["turns"]
        assert len(turns) == 1
        return turns[0]

    def only(self, kind: str) -> dict[str, Any]:
        """The payload of the one event of this kind."""
        found = payloads(self.events, kind)
        assert len(found) == 1, f"expected one {kind!r} event, got {self.kinds}"
        return found[0]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def play(chorus: Chorus, **body: Any) -> Turn:
    """Start a conversation, read its first turn to the end, and check that nothing is left
    behind: no upstream task, no upstream connection, no file descriptor."""
    fds_before = open_fds()
    created = await chorus.create(**body)
    stream = await chorus.subscribe(created["id"])
    assert stream.status == 200
    events = await stream.until_turn_ends()
    stream.close()
    await eventually(lambda: not upstream_tasks())
    state = await chorus.state(created["id"])
    # The upstream connection is released (or closed) and the subscriber's is gone: the
    # process holds no more descriptors than before (pooled keep-alive ones excepted).
    await eventually(lambda: open_fds() <= fds_before + _POOLED_CONNECTIONS)
    messages = body.get("messages", [{"role": "user", "content": "hello"}])
    prompt_chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    return Turn(
        id=created["id"], events=events, raw=bytes(stream.raw), state=state,
        prompt_chars=prompt_chars,
    )


# Keep-alive connections aiohttp may pool after a turn: one from Chorus to the upstream,
# one from the test client to Chorus (and their server-side ends).
_POOLED_CONNECTIONS = 4


def choice_state(
    choice: int = 0,
    *,
    content: str = "",
    finish_reason: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    refusal: str | None = None,
) -> dict[str, Any]:
    return {
        "choice": choice,
        "content": content,
        "tool_calls": tool_calls,
        "refusal": refusal,
        "finish_reason": finish_reason,
    }


def assert_failed(
    turn: Turn,
    code: TurnErrorCode,
    message: str,
    *,
    choices: list[dict[str, Any]],
    answers: int = 0,
    usage: dict[str, Any] | None = None,
) -> None:
    """The turn ended with exactly one `error` event and the state agrees with it."""
    if usage is None:
        usage = turn.estimated_usage
    assert turn.kinds == ["turn", *["answer"] * answers, "error"]
    status = "cancelled" if code is TurnErrorCode.CANCELLED else "error"
    error = turn.only("error")
    assert error == {
        "turn": 0,
        "code": str(code),
        "message": message,
        "choices": [
            {"choice": c["choice"], "finish_reason": c["finish_reason"]}
            for c in choices
            if c["finish_reason"] is not None
        ],
        "usage": usage,
    }
    assert turn.state["status"] == status
    assert turn.reported == {
        "turn": 0,
        "status": status,
        "model": "test-model",
        "usage": usage,
        "choices": choices,
        "error": {"code": str(code), "message": message},
    }


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The upstream client's "retrying" log lines, each cut before its random delay."""
    return [
        record.getMessage().rpartition(" ")[0].rpartition(" ")[0]
        for record in caplog.records
        if record.name == "server.upstream" and "retrying in" in record.getMessage()
    ]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, noted, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- the request ----------------------------------------------------------------------------


class TestRequest:
    """What Chorus sends upstream: a streaming POST with the key, the model, the client's params."""

    async def test_request_is_a_streaming_post_with_the_key_and_the_default_model(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fake_upstream.enqueue(answer_script(["Hi"]))
        chorus = await start_chorus()
        turn = await play(chorus)

        assert turn.kinds == ["turn", "answer", "done"]
        assert fake_upstream.requests == [
            {
                "model": "test-model",
                "messages": MESSAGES,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ]
        headers = fake_upstream.headers[0]
        assert headers["Authorization"] == f"Bearer {API_KEY}"
        assert headers["Content-Type"] == "application/json"
        assert headers["Accept"] == "text/event-stream"
        assert turn.only("turn") == {"turn": 0, "model": "test-model"}

    async def test_client_params_pass_through_and_its_stream_options_are_overridden(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        tools = [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ]
        fake_upstream.enqueue(answer_script(["Hi"]))
        chorus = await start_chorus()
        turn = await play(
            chorus,
            model="gpt-custom",
            temperature=0.25,
            max_tokens=7,
            tools=tools,
            tool_choice="auto",
            n=1,
            stream=False,
            stream_options={"include_usage": False},
        )

        assert turn.kinds == ["turn", "answer", "done"]
        assert fake_upstream.requests == [
            {
                "model": "gpt-custom",
                "messages": MESSAGES,
                "temperature": 0.25,
                "max_tokens": 7,
                "tools": tools,
                "tool_choice": "auto",
                "n": 1,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ]
        assert turn.only("turn") == {"turn": 0, "model": "gpt-custom"}
        assert turn.reported["model"] == "gpt-custom"


# --- parsing the stream ---------------------------------------------------------------------


def _stream(newline: bytes, *, space: bool = True) -> bytes:
    """A whole answer ("Héllo 🎵", multi-byte UTF-8) with usage and [DONE], comments between."""
    chunks = [
        chunk(role="assistant", content=""),
        chunk(content="Hé"),
        chunk(content="llo 🎵"),
        chunk(finish_reason="stop"),
        usage_chunk(),
    ]
    keepalive = b": keepalive" + newline + newline
    frames = [keepalive]
    for obj in chunks:
        frame = sse(obj, newline=newline)
        if not space:
            frame = frame.replace(b"data: ", b"data:", 1)
        frames += [frame, keepalive]
    frames.append(sse("[DONE]", newline=newline))
    return b"".join(frames)


class Lockstep:
    """Plays a stream piece by piece, each sent only once Chorus has read the one before.

    Writes sent back to back coalesce into one read on loopback, which would test no split
    at all. Chorus's `SSEDecoder` is swapped for one that records the reads it is fed; the
    fake upstream waits for read k before sending piece k + 1, so every read is one piece.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pieces: list[bytes] = []
        self.received: list[bytes] = []
        self._read: list[asyncio.Event] = []
        lockstep = self

        class RecordingDecoder(SSEDecoder):
            def feed(self, data: bytes) -> list[ServerSentEvent]:
                lockstep.received.append(data)
                lockstep._read[len(lockstep.received) - 1].set()
                return super().feed(data)

        monkeypatch.setattr(server.upstream, "SSEDecoder", RecordingDecoder)

    def script(self, data: bytes, size: int) -> Script:
        steps: list[Step] = []
        for start in range(0, len(data), size):
            self.pieces.append(data[start : start + size])
            self._read.append(asyncio.Event())
            steps += [Send(self.pieces[-1]), WaitFor(self._read[-1])]
        return Script(steps)


@pytest.fixture
def lockstep(monkeypatch: pytest.MonkeyPatch) -> Lockstep:
    return Lockstep(monkeypatch)


SPLITS = {"whole": 1 << 20, "byte-by-byte": 1, "every-7-bytes": 7}
NEWLINES = {"LF": b"\n", "CRLF": b"\r\n", "CR": b"\r"}


class TestStreamParsing:
    """The SSE parser is incremental: any split of the bytes, any line ending, comments between."""

    @pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
    @pytest.mark.parametrize("newline", NEWLINES.values(), ids=NEWLINES.keys())
    async def test_any_split_and_any_line_ending_give_the_same_answer(
        self,
        start_chorus: StartChorus,
        fake_upstream: FakeUpstream,
        lockstep: Lockstep,
        newline: bytes,
        split: int,
    ) -> None:
        data = _stream(newline)
        fake_upstream.enqueue(lockstep.script(data, split))
        chorus = await start_chorus()
        turn = await play(chorus)

        # One read per piece, up to the blank line that ends [DONE] (a CRLF's last LF is
        # not needed to see it, so it may stay unread).
        assert lockstep.received == lockstep.pieces[: len(lockstep.received)]
        assert b"".join(lockstep.received) in (data, data[:-1])
        assert turn.kinds == ["turn", "answer", "answer", "done"]
        assert payloads(turn.events, "answer") == [
            {"turn": 0, "choice": 0, "content": "Hé"},
            {"turn": 0, "choice": 0, "content": "llo 🎵"},
        ]
        assert turn.only("done") == {
            "turn": 0,
            "finish_reason": "stop",
            "usage": USAGE,
            "choices": [{"choice": 0, "finish_reason": "stop"}],
        }
        assert turn.state["status"] == "done"
        assert turn.reported["choices"] == [choice_state(content="Héllo 🎵", finish_reason="stop")]
        assert fake_upstream.calls == 1

    async def test_data_field_without_a_space_after_the_colon(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream, lockstep: Lockstep
    ) -> None:
        fake_upstream.enqueue(lockstep.script(_stream(b"\r\n", space=False), 5))
        chorus = await start_chorus()
        turn = await play(chorus)

        assert turn.kinds == ["turn", "answer", "answer", "done"]
        assert answer_text(turn.events) == "Héllo 🎵"

    @pytest.mark.parametrize("newline", NEWLINES.values(), ids=NEWLINES.keys())
    async def test_an_event_field_stays_with_its_data_across_every_split(
        self,
        start_chorus: StartChorus,
        fake_upstream: FakeUpstream,
        lockstep: Lockstep,
        newline: bytes,
    ) -> None:
        # A CR at the end of one read and its LF at the start of the next are one line
        # ending; read as two, the blank line would end the event before its data.
        data = sse(chunk(content="Hel"), newline=newline) + newline.join(
            [b"event: error", b"data: overloaded", b"", b""]
        )
        fake_upstream.enqueue(lockstep.script(data, 1))
        chorus = await start_chorus()
        turn = await play(chorus)

        assert_failed(
            turn,
            TurnErrorCode.UPSTREAM_ERROR,
            "overloaded",
            choices=[choice_state(content="Hel")],
            answers=1,
        )


# --- every delta field ----------------------------------------------------------------------


class TestDeltaFields:
    """Content, role, tool_calls, refusal, finish_reason, usage and several choices all arrive."""

    async def test_a_role_only_delta_makes_no_answer_event(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fake_upstream.enqueue(
            Script(
                [
                    Send(sse(chunk(role="assistant"))),
                    Send(sse(chunk(role="assistant", content=""))),
                    Send(sse(chunk(content="Hi"))),
                    Send(sse(chunk(content="!", finish_reason="stop"))),
                    Send(sse(usage_chunk())),
                    Send(DONE),
                ]
            )
        )
        chorus = await start_chorus()
        turn = await play(chorus)

        assert turn.kinds == ["turn", "answer", "answer", "done"]
        assert payloads(turn.events, "answer") == [
            {"turn": 0, "choice": 0, "content": "Hi"},
            {"turn": 0, "choice": 0, "content": "!"},
        ]
        assert turn.reported == {
            "turn": 0,
            "status": "done",
            "model": "test-model",
            "usage": USAGE,
            "choices": [choice_state(content="Hi!", finish_reason="stop")],
        }

    async def test_tool_call_fragments_are_carried_and_merged_by_index(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fragments: list[list[dict[str, Any]]] = [
            [
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ],
            [{"index": 0, "function": {"arguments": '{"ci'}}],
            [
                {"index": 0, "function": {"arguments": 'ty": "Paris"}'}},
                {
                    "index": 1,
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"tz"'},
                },
            ],
            [{"index": 1, "function": {"arguments": ': "CET"}'}}],
        ]
        steps: list[Step] = [Send(sse(chunk(role="assistant", content=None)))]
        steps += [Send(sse(chunk(tool_calls=calls))) for calls in fragments]
        steps += [Send(sse(chunk(finish_reason="tool_calls"))), Send(DONE)]
        fake_upstream.enqueue(Script(steps))
        chorus = await start_chorus()
        turn = await play(chorus)

        assert turn.kinds == ["turn", "answer", "answer", "answer", "answer", "done"]
        assert payloads(turn.events, "answer") == [
            {"turn": 0, "choice": 0, "content": "", "tool_calls": calls} for calls in fragments
        ]
        assert turn.only("done")["finish_reason"] == "tool_calls"
        assert turn.reported["choices"] == [
            choice_state(
                finish_reason="tool_calls",
                tool_calls=[
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "index": 1,
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
                    },
                ],
            )
        ]

    async def test_a_refusal_is_carried_and_concatenated(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fake_upstream.enqueue(
            Script(
                [
                    Send(sse(chunk(role="assistant", refusal=""))),
                    Send(sse(chunk(refusal="I can't "))),
                    Send(sse(chunk(refusal="help with that."))),
                    Send(sse(chunk(finish_reason="stop"))),
                    Send(DONE),
                ]
            )
        )
        chorus = await start_chorus()
        turn = await play(chorus)

        assert turn.kinds == ["turn", "answer", "answer", "done"]
        assert payloads(turn.events, "answer") == [
            {"turn": 0, "choice": 0, "content": "", "refusal": "I can't "},
            {"turn": 0, "choice": 0, "content": "", "refusal": "help with that."},
        ]
        assert turn.only("done") == {
            "turn": 0,
            "finish_reason": "stop",
            "usage": turn.estimated_usage,
            "choices": [{"choice": 0, "finish_reason": "stop"}],
        }
        assert turn.reported["choices"] == [
            choice_state(refusal="I can't help with that.", finish_reason="stop")
        ]

    async def test_two_choices_stream_side_by_side(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fake_upstream.enqueue(
            Script(
                [
                    Send(sse(chunk(index=0, role="assistant", content=""))),
                    Send(sse(chunk(index=1, role="assistant", content=""))),
                    Send(sse(chunk(index=0, content="Red"))),
                    Send(sse(chunk(index=1, content="Blue"))),
                    Send(sse(chunk(index=1, content=" sky", finish_reason="length"))),
                    Send(sse(chunk(index=0, content=" fox"))),
                    Send(sse(chunk(index=0, finish_reason="stop"))),
                    Send(sse(usage_chunk(4, 6))),
                    Send(DONE),
                ]
            )
        )
        chorus = await start_chorus()
        turn = await play(chorus, n=2)

        assert fake_upstream.requests[0]["n"] == 2
        assert turn.kinds == ["turn", "answer", "answer", "answer", "answer", "done"]
        assert [(p["choice"], p["content"]) for p in payloads(turn.events, "answer")] == [
            (0, "Red"),
            (1, "Blue"),
            (1, " sky"),
            (0, " fox"),
        ]
        usage = {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
        assert turn.only("done") == {
            "turn": 0,
            "finish_reason": "stop",
            "usage": usage,
            "choices": [
                {"choice": 0, "finish_reason": "stop"},
                {"choice": 1, "finish_reason": "length"},
            ],
        }
        assert turn.reported == {
            "turn": 0,
            "status": "done",
            "model": "test-model",
            "usage": usage,
            "choices": [
                choice_state(0, content="Red fox", finish_reason="stop"),
                choice_state(1, content="Blue sky", finish_reason="length"),
            ],
        }

    async def test_a_stream_that_closes_without_done_marker_but_complete_is_done(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        script = answer_script(["Hel", "lo"])
        assert script.steps.pop() == Send(DONE)
        fake_upstream.enqueue(script)
        chorus = await start_chorus()
        turn = await play(chorus)

        assert turn.kinds == ["turn", "answer", "answer", "done"]
        assert turn.only("done")["usage"] == USAGE
        assert turn.reported["status"] == "done"
        assert turn.reported["choices"] == [choice_state(content="Hello", finish_reason="stop")]


# --- retries before the first chunk ---------------------------------------------------------


class TestRetries:
    """Refused connections, 429 and 5xx are retried until the first chunk, never after it."""

    @pytest.mark.parametrize(
        "failure",
        [
            Respond(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0"}),
            Respond(429, b'{"error": {"message": "slow down"}}'),
            Respond(500, b"oops"),
            Respond(502, b"bad gateway"),
            Respond(503, b"", {"Retry-After": "0"}),
            Script([Cut()]),
            Script([Send(b": keepalive\n\n"), Cut()]),
        ],
        ids=[
            "429-retry-after-0",
            "429",
            "500",
            "502",
            "503",
            "closed-before-headers",
            "closed-before-first-chunk",
        ],
    )
    async def test_a_transient_failure_is_retried_and_the_answer_arrives_once(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream, failure: Respond | Script
    ) -> None:
        first = failure if isinstance(failure, Script) else Script([failure])
        # Then a 503, so the answer comes on the last attempt max_retries=2 allows.
        fake_upstream.enqueue(first, Script([Respond(503)]), answer_script(["Hel", "lo"]))
        chorus = await start_chorus()
        turn = await play(chorus)

        assert fake_upstream.calls == 3
        assert fake_upstream.requests[0] == fake_upstream.requests[1] == fake_upstream.requests[2]
        assert turn.kinds == ["turn", "answer", "answer", "done"]
        assert answer_text(turn.events) == "Hello"
        assert turn.reported["choices"] == [choice_state(content="Hello", finish_reason="stop")]

    async def test_http_errors_past_max_retries_end_with_upstream_error(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        body = orjson.dumps(
            {"error": {"message": "The engine is currently overloaded", "type": "server_error"}}
        )
        fake_upstream.enqueue(
            *[Script([Respond(503, body)]) for _ in range(3)], answer_script(["never"])
        )
        chorus = await start_chorus()
        turn = await play(chorus)

        assert fake_upstream.calls == 3  # the first attempt and max_retries=2 more
        assert_failed(
            turn,
            TurnErrorCode.UPSTREAM_ERROR,
            "upstream answered HTTP 503: server_error: The engine is currently overloaded",
            choices=[],
        )

    async def test_max_retries_zero_means_a_single_attempt(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fake_upstream.enqueue(Script([Respond(500, b"boom")]), answer_script(["never"]))
        chorus = await start_chorus(upstream={"max_retries": 0})
        turn = await play(chorus)

        assert fake_upstream.calls == 1
        assert_failed(
            turn, TurnErrorCode.UPSTREAM_ERROR, "upstream answered HTTP 500: boom", choices=[]
        )

    async def test_a_retry_after_beyond_the_allowed_wait_is_not_waited_for(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fake_upstream.enqueue(
            Script([Respond(429, b"busy", {"Retry-After": "3600"})]), answer_script(["never"])
        )
        chorus = await start_chorus()
        turn = await play(chorus)

        assert fake_upstream.calls == 1
        assert_failed(
            turn, TurnErrorCode.UPSTREAM_ERROR, "upstream answered HTTP 429: busy", choices=[]
        )

    async def test_a_refused_connection_past_max_retries_is_upstream_unavailable(
        self,
        start_chorus: StartChorus,
        fake_upstream: FakeUpstream,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        port = closed_port()
        chorus = await start_chorus(upstream={"base_url": f"http://127.0.0.1:{port}/v1"})
        turn = await play(chorus)

        message = (
            f"could not connect to upstream: [Errno 111] Connect call failed ('127.0.0.1', {port})"
        )
        assert retry_warnings(caplog) == [
            f"conversation {turn.id}: upstream attempt {attempt} failed "
            f"(upstream_unavailable: {message}); retrying in"
            for attempt in (1, 2)
        ]
        assert fake_upstream.calls == 0
        assert_failed(turn, TurnErrorCode.UPSTREAM_UNAVAILABLE, message, choices=[])

    async def test_closed_before_the_first_chunk_past_max_retries_is_upstream_unavailable(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fake_upstream.enqueue(*[Script([Cut()]) for _ in range(3)], answer_script(["never"]))
        chorus = await start_chorus()
        turn = await play(chorus)

        assert fake_upstream.calls == 3
        assert_failed(
            turn,
            TurnErrorCode.UPSTREAM_UNAVAILABLE,
            "upstream closed the connection before the first chunk (ServerDisconnectedError)",
            choices=[],
        )

    @pytest.mark.parametrize(
        ("status", "body", "message"),
        [
            (
                400,
                b'{"error": {"message": "Unknown parameter: foo", '
                b'"type": "invalid_request_error"}}',
                "upstream answered HTTP 400: invalid_request_error: Unknown parameter: foo",
            ),
            (401, b"", "upstream answered HTTP 401: (empty body)"),
            (
                404,
                b'{"error": {"message": "no such model"}}',
                "upstream answered HTTP 404: no such model",
            ),
        ],
        ids=["400", "401", "404"],
    )
    async def test_a_client_error_is_not_retried(
        self,
        start_chorus: StartChorus,
        fake_upstream: FakeUpstream,
        status: int,
        body: bytes,
        message: str,
    ) -> None:
        fake_upstream.enqueue(Script([Respond(status, body)]), answer_script(["never"]))
        chorus = await start_chorus()
        turn = await play(chorus)

        assert fake_upstream.calls == 1
        assert_failed(turn, TurnErrorCode.UPSTREAM_ERROR, message, choices=[])

    async def test_a_stream_cut_mid_answer_is_never_retried_and_keeps_the_partial_answer(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fake_upstream.enqueue(
            Script(
                [
                    Send(sse(chunk(role="assistant", content=""))),
                    Send(sse(chunk(content="Hel"))),
                    Send(sse(chunk(content="lo"))),
                    Cut(),
                ]
            ),
            answer_script(["never"]),
        )
        chorus = await start_chorus()
        turn = await play(chorus)

        assert fake_upstream.calls == 1
        assert_failed(
            turn,
            TurnErrorCode.UPSTREAM_PROTOCOL,
            INCOMPLETE + "no finish_reason for choice 0",
            choices=[choice_state(content="Hello")],
            answers=2,
        )
        assert answer_text(turn.events) == "Hello"


# --- timeouts -------------------------------------------------------------------------------


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A loopback port whose accept queue is full, so a new connection attempt hangs.

    The listener never accepts and its backlog is filled by a few connections first; Linux
    then drops further SYNs, which is the only clean way to stall a connect on loopback.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        fillers = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            yield port
        finally:
            for filler in fillers:
                filler.close()


class TestTimeouts:
    """The connection, the first chunk and every gap after it are bounded.

    Running out of any is upstream_timeout, except silence after every choice's
    finish_reason: then only the usage chunk or [DONE] is missing, and the turn is done.
    """

    async def test_no_connection_in_time_is_retried_then_upstream_timeout(
        self,
        start_chorus: StartChorus,
        unaccepting_port: int,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        chorus = await start_chorus(
            upstream={"base_url": f"http://127.0.0.1:{unaccepting_port}/v1", "connect_timeout": 0.2}
        )
        turn = await play(chorus)

        message = "could not connect to upstream within 0.2 s"
        assert retry_warnings(caplog) == [
            f"conversation {turn.id}: upstream attempt {attempt} failed "
            f"(upstream_timeout: {message}); retrying in"
            for attempt in (1, 2)
        ]
        assert_failed(turn, TurnErrorCode.UPSTREAM_TIMEOUT, message, choices=[])

    async def test_no_first_chunk_in_time_is_upstream_timeout(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        # A comment is bytes but not a chunk: it does not hold the first-chunk deadline off.
        fake_upstream.enqueue(Script([Send(b": keepalive\n\n"), Hang()]), answer_script(["never"]))
        chorus = await start_chorus(upstream=FAST_TIMEOUTS)
        turn = await play(chorus)

        assert fake_upstream.calls == 1
        assert_failed(
            turn, TurnErrorCode.UPSTREAM_TIMEOUT, "no chunk from upstream within 0.3 s", choices=[]
        )
        await eventually(lambda: fake_upstream.active == 0)

    async def test_no_response_headers_in_time_is_upstream_timeout(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fake_upstream.enqueue(Script([Hang()]))
        chorus = await start_chorus(upstream=FAST_TIMEOUTS)
        turn = await play(chorus)

        assert fake_upstream.calls == 1
        assert_failed(
            turn, TurnErrorCode.UPSTREAM_TIMEOUT, "no chunk from upstream within 0.3 s", choices=[]
        )
        await eventually(lambda: fake_upstream.active == 0)

    async def test_a_stall_mid_answer_is_upstream_timeout(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        never = asyncio.Event()
        fake_upstream.enqueue(
            Script(
                [
                    Send(sse(chunk(role="assistant", content=""))),
                    Send(sse(chunk(content="Hel"))),
                    WaitFor(never),
                ]
            )
        )
        chorus = await start_chorus(upstream=FAST_TIMEOUTS)
        turn = await play(chorus)

        assert fake_upstream.calls == 1
        assert_failed(
            turn,
            TurnErrorCode.UPSTREAM_TIMEOUT,
            "upstream sent nothing for 0.3 s",
            choices=[choice_state(content="Hel")],
            answers=1,
        )
        await eventually(lambda: fake_upstream.active == 0)

    async def test_a_stall_after_every_finish_reason_is_done(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        never = asyncio.Event()
        fake_upstream.enqueue(
            Script(
                [
                    Send(sse(chunk(index=0, content="A"))),
                    Send(sse(chunk(index=1, content="B"))),
                    Send(sse(chunk(index=0, finish_reason="stop"))),
                    Send(sse(chunk(index=1, finish_reason="length"))),
                    WaitFor(never),
                ]
            )
        )
        chorus = await start_chorus(upstream=FAST_TIMEOUTS)
        turn = await play(chorus, n=2)

        assert turn.kinds == ["turn", "answer", "answer", "done"]
        assert turn.only("done") == {
            "turn": 0,
            "finish_reason": "stop",
            "usage": turn.estimated_usage,
            "choices": [
                {"choice": 0, "finish_reason": "stop"},
                {"choice": 1, "finish_reason": "length"},
            ],
        }
        assert turn.state["status"] == "done"
        assert turn.reported["choices"] == [
            choice_state(0, content="A", finish_reason="stop"),
            choice_state(1, content="B", finish_reason="length"),
        ]
        await eventually(lambda: fake_upstream.active == 0)

    async def test_a_stall_while_one_of_two_choices_is_open_is_upstream_timeout(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        never = asyncio.Event()
        fake_upstream.enqueue(
            Script(
                [
                    Send(sse(chunk(index=0, content="A", finish_reason="stop"))),
                    Send(sse(chunk(index=1, content="B"))),
                    WaitFor(never),
                ]
            )
        )
        chorus = await start_chorus(upstream=FAST_TIMEOUTS)
        turn = await play(chorus, n=2)

        assert_failed(
            turn,
            TurnErrorCode.UPSTREAM_TIMEOUT,
            "upstream sent nothing for 0.3 s",
            choices=[
                choice_state(0, content="A", finish_reason="stop"),
                choice_state(1, content="B"),
            ],
            answers=2,
        )


# --- protocol violations --------------------------------------------------------------------


class TestSlowUpstream:
    """A slow upstream that stays within its timeouts is not a failure."""

    async def test_a_slow_but_steady_upstream_completes(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        pieces = [f"slow {i} " for i in range(12)]
        # 80 ms between chunks against a 0.3 s idle timeout: slow, never silent for long.
        fake_upstream.enqueue(answer_script(pieces, pace=0.08))
        chorus = await start_chorus(upstream={"idle_timeout": 0.3, "first_chunk_timeout": 0.3})
        turn = await play(chorus)

        assert turn.kinds == ["turn", *["answer"] * len(pieces), "done"]
        assert answer_text(turn.events) == "".join(pieces)
        assert turn.reported["status"] == "done"
        assert fake_upstream.calls == 1


class TestTotalDeadline:
    """`upstream.total_timeout` bounds a whole turn even when chunks keep coming."""

    async def test_a_turn_past_the_total_deadline_is_cut(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        # A chunk every 50 ms for ever: the idle timeout never fires, the total one does.
        fake_upstream.enqueue(answer_script(["tick "] * 400, pace=0.05))
        chorus = await start_chorus(upstream={"total_timeout": 0.5, "idle_timeout": 5.0})
        turn = await play(chorus)

        ticks = len(payloads(turn.events, "answer"))
        assert 0 < ticks < 400
        assert_failed(
            turn,
            TurnErrorCode.UPSTREAM_TIMEOUT,
            "the answer took longer than upstream.total_timeout (0.5 s)",
            choices=[choice_state(content="tick " * ticks)],
            answers=ticks,
        )
        # Cut, so upstream reported no usage: it is estimated, and says so.
        assert turn.reported["usage"]["estimated"] is True
        assert turn.reported["usage"]["completion_tokens"] == -(-len("tick " * ticks) // 4)


class TestProtocolViolations:
    """A stream Chorus cannot trust ends the turn with upstream_protocol, keeping what arrived."""

    async def test_a_chunk_that_is_not_json_is_upstream_protocol(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fake_upstream.enqueue(
            Script(
                [
                    Send(sse(chunk(content="Hel"))),
                    Send(b"data: {not json\n\n"),
                    Send(sse(chunk(content="lo", finish_reason="stop"))),
                    Send(DONE),
                ]
            )
        )
        chorus = await start_chorus()
        turn = await play(chorus)

        assert fake_upstream.calls == 1
        assert_failed(
            turn,
            TurnErrorCode.UPSTREAM_PROTOCOL,
            "upstream sent a chunk that is not valid JSON",
            choices=[choice_state(content="Hel")],
            answers=1,
        )

    async def test_done_marker_before_a_finish_reason_is_upstream_protocol(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fake_upstream.enqueue(
            Script(
                [
                    Send(sse(chunk(index=0, content="A", finish_reason="stop"))),
                    Send(sse(chunk(index=1, content="B"))),
                    Send(sse(usage_chunk())),
                    Send(DONE),
                ]
            )
        )
        chorus = await start_chorus()
        turn = await play(chorus, n=2)

        assert_failed(
            turn,
            TurnErrorCode.UPSTREAM_PROTOCOL,
            INCOMPLETE + "no finish_reason for choice 1",
            choices=[
                choice_state(0, content="A", finish_reason="stop"),
                choice_state(1, content="B"),
            ],
            answers=2,
            usage=USAGE,
        )

    @pytest.mark.parametrize(
        ("steps", "usage"),
        [([], None), ([Send(b": keepalive\n\n")], None), ([Send(sse(usage_chunk()))], USAGE)],
        ids=["empty", "comment-only", "usage-only"],
    )
    async def test_a_clean_close_without_any_choice_is_upstream_protocol(
        self,
        start_chorus: StartChorus,
        fake_upstream: FakeUpstream,
        steps: list[Step],
        usage: dict[str, int] | None,
    ) -> None:
        fake_upstream.enqueue(Script(steps), answer_script(["never"]))
        chorus = await start_chorus()
        turn = await play(chorus)

        assert fake_upstream.calls == 1
        assert_failed(
            turn,
            TurnErrorCode.UPSTREAM_PROTOCOL,
            INCOMPLETE + "no choice at all",
            choices=[],
            usage=usage,
        )

    async def test_a_200_json_answer_is_upstream_protocol(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        completion = {"object": "chat.completion", "choices": [{"message": {"content": "Hi"}}]}
        fake_upstream.enqueue(
            Script([Send(orjson.dumps(completion))], content_type="application/json"),
            answer_script(["never"]),
        )
        chorus = await start_chorus()
        turn = await play(chorus)

        assert fake_upstream.calls == 1
        assert_failed(
            turn,
            TurnErrorCode.UPSTREAM_PROTOCOL,
            "upstream answered 200 with content type 'application/json', not text/event-stream",
            choices=[],
        )


# --- in-band errors -------------------------------------------------------------------------


class TestInBandErrors:
    """An error reported inside a 200 stream ends the turn with upstream_error and its message."""

    @pytest.mark.parametrize(
        "frame",
        [
            b'data: {"error": {"message": "The server had an error", "type": "server_error"}}\n\n',
            b'event: error\ndata: {"error": {"message": "The server had an error", '
            b'"type": "server_error"}}\n\n',
            b'event: error\r\ndata: {"message": "The server had an error", '
            b'"type": "server_error"}\r\n\r\n',
        ],
        ids=["error-object", "error-event", "error-event-bare-object"],
    )
    async def test_an_in_band_error_is_upstream_error_with_its_message(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream, frame: bytes
    ) -> None:
        fake_upstream.enqueue(
            Script([Send(sse(chunk(content="Hel"))), Send(frame), Send(DONE)]),
            answer_script(["never"]),
        )
        chorus = await start_chorus()
        turn = await play(chorus)

        assert fake_upstream.calls == 1
        assert_failed(
            turn,
            TurnErrorCode.UPSTREAM_ERROR,
            "server_error: The server had an error",
            choices=[choice_state(content="Hel")],
            answers=1,
        )

    async def test_an_error_event_with_plain_text_data(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fake_upstream.enqueue(Script([Send(b"event: error\ndata: overloaded, try later\n\n")]))
        chorus = await start_chorus()
        turn = await play(chorus)

        assert_failed(turn, TurnErrorCode.UPSTREAM_ERROR, "overloaded, try later", choices=[])


# --- the API key stays secret ---------------------------------------------------------------


ECHOED = (
    f"Incorrect API key provided: {API_KEY}. You can find your API key at "
    "https://platform.openai.com/account/api-keys."
)
MASKED = "Incorrect API key provided: sk-test-**********************6789."
OTHER_KEY = "gsk_0123456789abcdefghijklmnopqrstuv"  # not shaped like an OpenAI key


class TestApiKeySecrecy:
    """Whatever upstream echoes back, the key reaches no event, no state and no log line."""

    @pytest.mark.parametrize(
        ("script", "message"),
        [
            (
                Script(
                    [
                        Respond(
                            401,
                            orjson.dumps(
                                {"error": {"message": ECHOED, "type": "invalid_request_error"}}
                            ),
                        )
                    ]
                ),
                "upstream answered HTTP 401: invalid_request_error: Incorrect API key provided: "
                "[redacted]. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
            ),
            (
                Script([Respond(401, f"bad key {API_KEY}".encode())]),
                "upstream answered HTTP 401: bad key [redacted]",
            ),
            (
                Script([Respond(401, orjson.dumps({"error": {"message": MASKED}}))]),
                "upstream answered HTTP 401: Incorrect API key provided: [redacted].",
            ),
            (
                Script([Send(sse({"error": {"message": f"key {API_KEY} revoked"}}))]),
                "key [redacted] revoked",
            ),
            (
                Script([Send(f"event: error\ndata: key {API_KEY} revoked\n\n".encode())]),
                "key [redacted] revoked",
            ),
        ],
        ids=["401-json", "401-text", "401-masked", "in-band", "error-event"],
    )
    async def test_the_api_key_never_reaches_events_state_or_logs(
        self,
        start_chorus: StartChorus,
        fake_upstream: FakeUpstream,
        caplog: pytest.LogCaptureFixture,
        script: Script,
        message: str,
    ) -> None:
        caplog.set_level(logging.DEBUG)
        fake_upstream.enqueue(script)
        chorus = await start_chorus()
        turn = await play(chorus)

        assert fake_upstream.calls == 1
        assert_failed(turn, TurnErrorCode.UPSTREAM_ERROR, message, choices=[])
        assert b"sk-" not in turn.raw
        assert "sk-" not in orjson.dumps(turn.state).decode()
        assert "sk-" not in caplog.text
        assert "[redacted]" in caplog.text

    @pytest.mark.parametrize(
        ("script", "message"),
        [
            # An error body's text is cut at 300 characters, an error message at 500.
            (
                Script([Respond(401, ("x" * 285 + " " + OTHER_KEY).encode())]),
                "upstream answered HTTP 401: " + "x" * 285 + " [redacted]",
            ),
            (
                Script([Send(sse({"error": {"message": "y" * 485 + " " + OTHER_KEY}}))]),
                "y" * 485 + " [redacted]",
            ),
        ],
        ids=["error-body", "in-band"],
    )
    async def test_a_key_cut_in_two_by_the_message_bound_is_still_redacted(
        self,
        start_chorus: StartChorus,
        fake_upstream: FakeUpstream,
        caplog: pytest.LogCaptureFixture,
        script: Script,
        message: str,
    ) -> None:
        caplog.set_level(logging.DEBUG)
        fake_upstream.enqueue(script)
        chorus = await start_chorus(upstream={"api_key": OTHER_KEY})
        turn = await play(chorus)

        assert_failed(turn, TurnErrorCode.UPSTREAM_ERROR, message, choices=[])
        for fragment in (OTHER_KEY[:4], OTHER_KEY[-4:]):
            assert fragment.encode() not in turn.raw
            assert fragment not in caplog.text


# --- cancellation ---------------------------------------------------------------------------


class TestCancellation:
    """POST /cancel stops the running turn, closes the upstream connection, and says so."""

    async def test_cancel_while_streaming_ends_the_turn_and_closes_the_upstream_connection(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        gate = asyncio.Event()
        fake_upstream.enqueue(
            Script(
                [
                    Send(sse(chunk(role="assistant", content=""))),
                    Send(sse(chunk(content="Hel"))),
                    WaitFor(gate),
                    Send(sse(chunk(content="lo", finish_reason="stop"))),
                    Send(DONE),
                ]
            )
        )
        chorus = await start_chorus()
        created = await chorus.create()
        stream = await chorus.subscribe(created["id"])
        await stream.until(lambda event: event.event == "answer")
        assert fake_upstream.active == 1

        response = await chorus.client.post(f"/v1/conversations/{created['id']}/cancel")
        assert response.status == 202
        assert await response.json() == {"id": created["id"], "status": "cancelled"}
        events = await stream.until_turn_ends()
        stream.close()
        await eventually(lambda: fake_upstream.active == 0)
        await eventually(lambda: not upstream_tasks())
        turn = Turn(
            created["id"], events, bytes(stream.raw), await chorus.state(created["id"]),
            prompt_chars=len("hello"),
        )

        assert fake_upstream.calls == 1
        assert_failed(
            turn,
            TurnErrorCode.CANCELLED,
            "cancelled by request",
            choices=[choice_state(content="Hel")],
            answers=1,
        )

    async def test_cancel_during_a_retry_wait_ends_the_turn_without_another_call(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        # Retry-After 20 s is within retry_after_max_seconds (30), so the client waits.
        fake_upstream.enqueue(
            Script([Respond(429, b"busy", {"Retry-After": "20"})]), answer_script(["never"])
        )
        chorus = await start_chorus()
        created = await chorus.create()
        await eventually(lambda: fake_upstream.calls == 1 and fake_upstream.active == 0)

        response = await chorus.client.post(f"/v1/conversations/{created['id']}/cancel")
        assert response.status == 202
        stream = await chorus.subscribe(created["id"])
        events = await stream.until_turn_ends()
        stream.close()
        await eventually(lambda: not upstream_tasks())
        turn = Turn(
            created["id"], events, bytes(stream.raw), await chorus.state(created["id"]),
            prompt_chars=len("hello"),
        )

        assert fake_upstream.calls == 1
        assert_failed(turn, TurnErrorCode.CANCELLED, "cancelled by request", choices=[])

    async def test_cancel_when_nothing_streams_is_409(
        self, start_chorus: StartChorus, fake_upstream: FakeUpstream
    ) -> None:
        fake_upstream.enqueue(answer_script(["Hi"]))
        chorus = await start_chorus()
        turn = await play(chorus)
        assert turn.kinds == ["turn", "answer", "done"]

        response = await chorus.client.post(f"/v1/conversations/{turn.id}/cancel")
        assert response.status == 409
        assert response.content_type == "application/json"
        assert await response.json() == {
            "error": {"code": "not_streaming", "message": "no turn is streaming"}
        }
        assert (await chorus.state(turn.id))["status"] == "done"


# --- parse_retry_after ----------------------------------------------------------------------


NOW = 1_445_412_470.0  # 10 s before Wed, 21 Oct 2015 07:28:00 GMT


@pytest.fixture
def far_from_utc() -> Iterator[None]:
    """Run with the process's local time zone set far from UTC."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TZ", "KIR-14")  # POSIX for UTC+14; needs no tz database
        time.tzset()
        yield
    time.tzset()


class TestParseRetryAfter:
    """Retry-After as delta-seconds or an HTTP-date (always GMT); anything else is ignored."""

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [
            ("0", 0.0),
            ("3", 3.0),
            (" 7 ", 7.0),
            ("1.5", 1.5),
            ("Wed, 21 Oct 2015 07:28:00 GMT", 10.0),
            ("Wed, 21 Oct 2015 07:28:00 +0000", 10.0),
            ("Wed, 21 Oct 2015 09:28:00 +0200", 10.0),
            ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past: retry now
            (None, None),
            ("", None),
            ("soon", None),
            ("nan", None),
            ("Wed, 32 Oct 2015 07:28:00 GMT", None),
        ],
    )
    def test_parse_retry_after(self, value: str | None, seconds: float | None) -> None:
        assert parse_retry_after(value, now=NOW) == seconds

    @pytest.mark.usefixtures("far_from_utc")
    @pytest.mark.parametrize(
        "value", ["Wed, 21 Oct 2015 07:28:00 GMT", "Wed, 21 Oct 2015 07:28:00 -0000"]
    )
    def test_parse_retry_after_http_date_is_gmt_whatever_the_local_zone(self, value: str) -> None:
        assert time.timezone != 0
        assert parse_retry_after(value, now=NOW) == 10.0

    def test_parse_retry_after_measures_from_the_clock_by_default(self) -> None:
        in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
        seconds = parse_retry_after(in_a_minute)
        assert seconds is not None
        assert 55.0 <= seconds <= 60.0


# --- redact ---------------------------------------------------------------------------------


class TestRedact:
    """The configured key, and anything shaped like a key, becomes [redacted]."""

    @pytest.mark.parametrize(
        ("text", "secret", "expected"),
        [
            (f"bad key {API_KEY}!", API_KEY, "bad key [redacted]!"),
            (f"{API_KEY}{API_KEY}", API_KEY, "[redacted][redacted]"),
            ("key sk-proj-abcdef123456 leaked", None, "key [redacted] leaked"),
            ("key sk-proj-abcdef123456 leaked", "", "key [redacted] leaked"),
            ("masked sk-abc***********wxyz.", None, "masked [redacted]."),
            ("token=hunter2&x=1", "hunter2", "token=[redacted]&x=1"),
            ("cut short: gsk_0123", "gsk_0123456789", "cut short: [redacted]"),
            ("cut short: gsk_", "gsk_0123456789", "cut short: [redacted]"),
            ("cut short: gsk", "gsk_0123456789", "cut short: gsk"),
            ("gsk_0123 in the middle", "gsk_0123456789", "gsk_0123 in the middle"),
            ("a task-list and sk-12 are not keys", API_KEY, "a task-list and sk-12 are not keys"),
            ("nothing to hide", API_KEY, "nothing to hide"),
        ],
    )
    def test_redact(self, text: str, secret: str | None, expected: str) -> None:
        assert redact(text, secret) == expected


# --- parse_chunk ----------------------------------------------------------------------------


PROTOCOL = str(TurnErrorCode.UPSTREAM_PROTOCOL)
_USAGE_JSON = '{"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}'


class TestParseChunk:
    """One `data` payload in, a ChatChunk out, or an UpstreamFailure saying what was wrong."""

    @pytest.mark.parametrize(
        ("data", "expected"),
        [
            (
                '{"model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", '
                '"content": ""}, "finish_reason": null}]}',
                ChatChunk(choices=(ChoiceDelta(index=0, role="assistant", content=""),), model="m"),
            ),
            (
                '{"choices": [{"index": 2, "delta": {"content": "Hi"}, "finish_reason": null}]}',
                ChatChunk(choices=(ChoiceDelta(index=2, content="Hi"),)),
            ),
            (
                '{"choices": [{"delta": {}, "finish_reason": "stop"}]}',
                ChatChunk(choices=(ChoiceDelta(index=0, finish_reason="stop"),)),
            ),
            (
                '{"choices": [{"index": 0, "delta": null, "finish_reason": "length"}]}',
                ChatChunk(choices=(ChoiceDelta(index=0, finish_reason="length"),)),
            ),
            (
                '{"choices": [{"index": 0, "delta": {"refusal": "No."}}]}',
                ChatChunk(choices=(ChoiceDelta(index=0, refusal="No."),)),
            ),
            (
                '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c", '
                '"function": {"arguments": "{}"}}]}}]}',
                ChatChunk(
                    choices=(
                        ChoiceDelta(
                            index=0,
                            tool_calls=[{"index": 0, "id": "c", "function": {"arguments": "{}"}}],
                        ),
                    )
                ),
            ),
            (
                '{"choices": [{"index": 0, "delta": {"tool_calls": []}}]}',
                ChatChunk(choices=(ChoiceDelta(index=0),)),
            ),
            (
                '{"choices": [{"index": 0, "delta": {"content": "a"}}, '
                '{"index": 1, "delta": {"content": "b"}}]}',
                ChatChunk(
                    choices=(ChoiceDelta(index=0, content="a"), ChoiceDelta(index=1, content="b"))
                ),
            ),
            (
                '{"choices": [], "usage": ' + _USAGE_JSON + "}",
                ChatChunk(choices=(), usage=orjson.loads(_USAGE_JSON)),
            ),
            ('{"choices": null, "usage": null}', ChatChunk(choices=())),
            ("{}", ChatChunk(choices=())),
            ('{"error": null, "choices": [], "model": 5}', ChatChunk(choices=())),
        ],
        ids=[
            "role",
            "content-index-2",
            "finish-no-index",
            "null-delta",
            "refusal",
            "tool-calls",
            "empty-tool-calls",
            "two-choices",
            "usage",
            "nulls",
            "empty-object",
            "null-error-bad-model",
        ],
    )
    def test_parse_chunk(self, data: str, expected: ChatChunk) -> None:
        assert parse_chunk(data) == expected

    @pytest.mark.parametrize(
        ("data", "code", "message"),
        [
            ("{not json", PROTOCOL, "upstream sent a chunk that is not valid JSON"),
            ("", PROTOCOL, "upstream sent a chunk that is not valid JSON"),
            ("[1, 2]", PROTOCOL, "upstream sent a chunk that is not a JSON object"),
            ('"text"', PROTOCOL, "upstream sent a chunk that is not a JSON object"),
            ('{"choices": {"index": 0}}', PROTOCOL, "choices is not a list"),
            ('{"choices": [], "usage": 3}', PROTOCOL, "usage is not an object"),
            ('{"choices": ["x"]}', PROTOCOL, "a choice is not an object"),
            ('{"choices": [{"index": -1}]}', PROTOCOL, "a choice has no valid index"),
            ('{"choices": [{"index": "0"}]}', PROTOCOL, "a choice has no valid index"),
            ('{"choices": [{"index": true}]}', PROTOCOL, "a choice has no valid index"),
            ('{"choices": [{"delta": "hi"}]}', PROTOCOL, "a choice delta is not an object"),
            ('{"choices": [{"delta": {"content": 5}}]}', PROTOCOL, "content is not a string"),
            ('{"choices": [{"delta": {"role": []}}]}', PROTOCOL, "role is not a string"),
            (
                '{"choices": [{"delta": {"refusal": {}}}]}',
                PROTOCOL,
                "refusal is not a string",
            ),
            (
                '{"choices": [{"delta": {}, "finish_reason": 1}]}',
                PROTOCOL,
                "finish_reason is not a string",
            ),
            (
                '{"choices": [{"delta": {"tool_calls": {"index": 0}}}]}',
                PROTOCOL,
                "tool_calls is not a list of objects",
            ),
            (
                '{"choices": [{"delta": {"tool_calls": ["call"]}}]}',
                PROTOCOL,
                "tool_calls is not a list of objects",
            ),
            (
                '{"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}',
                "upstream_error",
                "rate_limit_error: Rate limit reached",
            ),
            ('{"error": {"message": "boom", "code": 500}}', "upstream_error", "500: boom"),
            ('{"error": {"type": "busy"}}', "upstream_error", 'busy: {"type":"busy"}'),
            ('{"error": "plain words"}', "upstream_error", "plain words"),
        ],
    )
    def test_parse_chunk_rejects(self, data: str, code: str, message: str) -> None:
        with pytest.raises(UpstreamFailure) as raised:
            parse_chunk(data)
        assert raised.value.code == code
        assert raised.value.message == message

    def test_parse_chunk_bounds_an_upstream_error_message(self) -> None:
        with pytest.raises(UpstreamFailure) as raised:
            parse_chunk(orjson.dumps({"error": {"message": "x" * 10_000}}).decode())
        assert raised.value.message == "x" * 500
