"""Tests for the embedded mock upstream (server/mock.py), over real sockets."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from server.mock import MockSettings, build_mock_app, main, mock_answer, split_into_chunks
from server.sse import ServerSentEvent, SSEDecoder

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]

UNPACED = MockSettings(chunks_per_second=0)
MESSAGES: list[dict[str, object]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is an SSE stream?"},
]


def completion_request(**extra: object) -> dict[str, object]:
    return {"model": "gpt-test", "messages": MESSAGES, "stream": True, **extra}


def decode_stream(body: bytes) -> tuple[list[dict[str, Any]], list[str]]:
    """Return the JSON chunks and the raw data of every event, asserting the framing."""
    decoder = SSEDecoder()
    events = decoder.feed(body)
    decoder.flush()
    assert body.endswith(b"data: [DONE]\n\n")
    assert all(frame.startswith(b"data: ") for frame in body.split(b"\n\n")[:-1])
    assert [event.event for event in events] == ["message"] * len(events)
    data = [event.data for event in events]
    assert data[-1] == "[DONE]"
    assert "[DONE]" not in data[:-1]
    return [orjson.loads(item) for item in data[:-1]], data


def content_of(chunks: list[dict[str, Any]], index: int) -> str:
    return "".join(
        choice["delta"].get("content", "")
        for chunk in chunks
        for choice in chunk["choices"]
        if choice["index"] == index
    )


def choice_chunks(chunks: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    return [choice for chunk in chunks for choice in chunk["choices"] if choice["index"] == index]


async def stream(client: TestClient[Any, Any], payload: dict[str, object]) -> list[dict[str, Any]]:
    response = await client.post("/v1/chat/completions", data=orjson.dumps(payload))
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-cache"
    chunks, _ = decode_stream(await response.read())
    return chunks


# --- pure functions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a",
        "  leading and trailing  ",
        "\n\n\n",
        "supercalifragilisticexpialidocious",
        "naïve café — 日本語 ✓ 🎵🎵🎵🎵🎵🎵🎵🎵🎵",
        'quote " backslash \\ tab\tend',
        mock_answer(MESSAGES),
        mock_answer(MESSAGES, repeat=3, choice=2),
    ],
)
def test_split_into_chunks_round_trips(text: str) -> None:
    pieces = split_into_chunks(text)
    assert "".join(pieces) == text
    assert all(0 < len(piece) <= 8 for piece in pieces)


def test_split_into_chunks_keeps_whitespace_with_the_word() -> None:
    assert split_into_chunks("  Hello big\nworld ") == ["  ", "Hello ", "big\n", "world "]


def test_mock_answer_quotes_question_and_exercises_rendering() -> None:
    answer = mock_answer(MESSAGES)
    assert answer.startswith("You asked: “What is an SSE stream?” (5 words).")
    assert "\n- **Markdown**" in answer
    assert "\n```python\n" in answer and answer.count("```") == 2
    assert "naïve café — 日本語 ✓ 🎵" in answer
    assert '"' in answer and "\\" in answer


def test_mock_answer_is_deterministic_and_depends_on_last_user_message() -> None:
    assert mock_answer(MESSAGES) == mock_answer([dict(message) for message in MESSAGES])
    later: list[dict[str, object]] = [
        *MESSAGES,
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "Why?"},
    ]
    assert mock_answer(later) != mock_answer(MESSAGES)
    assert mock_answer(later).startswith("You asked: “Why?” (1 word).")


def test_mock_answer_reads_text_parts_of_list_content() -> None:
    parts: list[dict[str, object]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is an"},
                {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}},
                {"type": "text", "text": "SSE stream?"},
            ],
        }
    ]
    assert mock_answer(parts) == mock_answer(MESSAGES)


def test_mock_answer_repeat_and_choice_prefix() -> None:
    base = mock_answer(MESSAGES)
    assert mock_answer(MESSAGES, repeat=3) == "\n\n".join([base] * 3)
    assert mock_answer(MESSAGES, choice=1) == "(alt 1) " + base
    with pytest.raises(ValueError):
        mock_answer(MESSAGES, repeat=0)


@pytest.mark.parametrize(
    "options",
    [{"chunks_per_second": float("nan")}, {"model": ""}, {"answer_repeat": 0}],
)
def test_mock_settings_reject_bad_values(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        MockSettings(**options)


def test_main_rejects_bad_repeat(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--repeat", "0"])
    assert exit_info.value.code == 2
    assert "answer_repeat must be at least 1" in capsys.readouterr().err


# --- the streaming endpoint ---------------------------------------------------------------


async def test_stream_content_equals_mock_answer(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(build_mock_app(UNPACED))
    chunks = await stream(client, completion_request())

    answer = mock_answer(MESSAGES)
    assert content_of(chunks, 0) == answer
    assert {chunk["id"] for chunk in chunks} == {"chatcmpl-mock-1"}
    assert {chunk["model"] for chunk in chunks} == {"gpt-test"}
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all(isinstance(chunk["created"], int) for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)

    choices = [chunk["choices"] for chunk in chunks]
    assert choices[0] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "finish_reason": None,
            "logprobs": None,
        }
    ]
    assert [c[0]["delta"] for c in choices[1:-1]] == [
        {"content": piece} for piece in split_into_chunks(answer)
    ]
    assert choices[-1] == [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}]


async def test_default_model_and_request_model(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(build_mock_app(MockSettings(chunks_per_second=0, model="m0")))
    payload = completion_request()
    del payload["model"]
    assert {chunk["model"] for chunk in await stream(client, payload)} == {"m0"}
    assert {chunk["model"] for chunk in await stream(client, completion_request())} == {"gpt-test"}


async def test_answer_repeat_setting(aiohttp_client: ClientFactory) -> None:
    settings = MockSettings(chunks_per_second=0, answer_repeat=4)
    client = await aiohttp_client(build_mock_app(settings))
    chunks = await stream(client, completion_request())
    assert content_of(chunks, 0) == mock_answer(MESSAGES, repeat=4)


async def test_usage_chunk_only_with_include_usage(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(build_mock_app(UNPACED))

    chunks = await stream(client, completion_request(stream_options={"include_usage": True}))
    pieces = split_into_chunks(mock_answer(MESSAGES))
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 8,  # words in every message's text
        "completion_tokens": len(pieces),
        "total_tokens": 8 + len(pieces),
    }
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert content_of(chunks, 0) == "".join(pieces)

    for options in ({"include_usage": False}, {}):
        chunks = await stream(client, completion_request(stream_options=options))
        assert all("usage" not in chunk for chunk in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_n_choices_interleaved_and_complete(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(build_mock_app(UNPACED))
    chunks = await stream(client, completion_request(n=2, stream_options={"include_usage": True}))

    for index in (0, 1):
        assert content_of(chunks, index) == mock_answer(MESSAGES, choice=index)
        per_choice = choice_chunks(chunks, index)
        assert per_choice[0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["finish_reason"] for c in per_choice] == [None] * (len(per_choice) - 1) + [
            "stop"
        ]
    indexes = [choice["index"] for chunk in chunks for choice in chunk["choices"]]
    assert indexes[:4] == [0, 1, 0, 1]
    assert all(len(chunk["choices"]) == 1 for chunk in chunks[:-1])
    total_pieces = sum(
        len(split_into_chunks(mock_answer(MESSAGES, choice=index))) for index in (0, 1)
    )
    assert chunks[-1]["usage"]["completion_tokens"] == total_pieces


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_gives_finish_reason_length(
    aiohttp_client: ClientFactory, field: str
) -> None:
    client = await aiohttp_client(build_mock_app(UNPACED))
    chunks = await stream(
        client, completion_request(**{field: 5}, stream_options={"include_usage": True})
    )
    assert content_of(chunks, 0) == "".join(split_into_chunks(mock_answer(MESSAGES))[:5])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 5


async def test_max_tokens_not_reached_gives_stop(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(build_mock_app(UNPACED))
    pieces = split_into_chunks(mock_answer(MESSAGES))
    chunks = await stream(client, completion_request(max_tokens=len(pieces)))
    assert content_of(chunks, 0) == mock_answer(MESSAGES)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stream_is_deterministic(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(build_mock_app(UNPACED))
    first = await stream(client, completion_request(n=2))
    second = await stream(client, completion_request(n=2))
    assert [chunk["choices"] for chunk in first] == [chunk["choices"] for chunk in second]
    assert first[0]["id"] == "chatcmpl-mock-1"
    assert second[0]["id"] == "chatcmpl-mock-2"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (orjson.dumps({"model": "m", "stream": True}), "messages"),
        (orjson.dumps({"messages": [], "stream": True}), "messages"),
        (orjson.dumps({"messages": "hi", "stream": True}), "messages"),
        (orjson.dumps({"messages": ["hi"], "stream": True}), "messages.0"),
        (orjson.dumps({"messages": MESSAGES}), "stream"),
        (orjson.dumps({"messages": MESSAGES, "stream": False}), "stream"),
        (orjson.dumps({"messages": MESSAGES, "stream": True, "n": 9}), "n"),
        (orjson.dumps({"messages": MESSAGES, "stream": True, "n": True}), "n"),
        (orjson.dumps({"messages": MESSAGES, "stream": True, "max_tokens": 0}), "max_tokens"),
        (orjson.dumps({"messages": MESSAGES, "stream": True, "model": 3}), "model"),
        (
            orjson.dumps({"messages": MESSAGES, "stream": True, "stream_options": []}),
            "stream_options",
        ),
        (b"{not json", None),
        (b"[]", None),
    ],
)
async def test_bad_request_gives_openai_error(
    aiohttp_client: ClientFactory, body: bytes, param: str | None
) -> None:
    client = await aiohttp_client(build_mock_app(UNPACED))
    response = await client.post("/v1/chat/completions", data=body)
    assert response.status == 400
    assert response.content_type == "application/json"
    error = orjson.loads(await response.read())
    assert set(error) == {"error"}
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == param
    assert error["error"]["code"] is None
    assert isinstance(error["error"]["message"], str) and error["error"]["message"]


async def test_authorization_is_accepted_and_never_logged(
    aiohttp_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await aiohttp_client(build_mock_app(UNPACED))
    response = await client.post(
        "/v1/chat/completions",
        data=orjson.dumps(completion_request()),
        headers={"Authorization": "Bearer sk-secret-value"},
    )
    assert response.status == 200
    await response.read()
    assert "mock completion chatcmpl-mock-1" in caplog.text
    assert "sk-secret-value" not in caplog.text


async def test_models_lists_the_one_model(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(build_mock_app(MockSettings(model="m1")))
    response = await client.get("/v1/models")
    assert response.status == 200
    assert orjson.loads(await response.read()) == {
        "object": "list",
        "data": [{"id": "m1", "object": "model", "created": 0, "owned_by": "chorus"}],
    }


async def test_mounted_as_subapp(aiohttp_client: ClientFactory) -> None:
    app = web.Application()
    app.add_subapp("/mock", build_mock_app(UNPACED))
    client = await aiohttp_client(app)
    response = await client.post(
        "/mock/v1/chat/completions", data=orjson.dumps(completion_request())
    )
    assert response.status == 200
    chunks, _ = decode_stream(await response.read())
    assert content_of(chunks, 0) == mock_answer(MESSAGES)


class _RecordSignal(logging.Handler):
    """Sets an asyncio.Event when a record containing `needle` is emitted."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.seen.set()


async def test_client_disconnect_stops_the_stream(
    aiohttp_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="server.mock")
    signal = _RecordSignal("mock completion chatcmpl-mock-1: c")  # "cancelled" or "client ..."
    logging.getLogger("server.mock").addHandler(signal)
    try:
        # Paced slowly so the stream is certainly still running when the client leaves.
        client = await aiohttp_client(build_mock_app(MockSettings(chunks_per_second=20)))
        response = await client.post(
            "/v1/chat/completions", data=orjson.dumps(completion_request())
        )
        decoder = SSEDecoder()
        events: list[ServerSentEvent] = []
        async for data in response.content.iter_any():
            events.extend(decoder.feed(data))
            if len(events) >= 3:
                break
        response.close()
        await asyncio.wait_for(signal.seen.wait(), timeout=10)

        # The server carries on serving.
        chunks = await stream(client, completion_request(max_tokens=1))
        assert content_of(chunks, 0) == split_into_chunks(mock_answer(MESSAGES))[0]
    finally:
        logging.getLogger("server.mock").removeHandler(signal)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


# --- benchmark options: stamp and hold ----------------------------------------------------

_STAMP = re.compile(r"t=(\d+\.\d{6});(.*)", re.DOTALL)


def unstamp(content: str) -> tuple[float, str]:
    """Split a stamped piece into its stamp and the piece; fail if it is not stamped."""
    match = _STAMP.fullmatch(content)
    assert match is not None, f"not stamped: {content!r}"
    return float(match.group(1)), match.group(2)


def stamped_pieces(chunks: list[dict[str, Any]]) -> list[tuple[float, str]]:
    return [
        unstamp(choice["delta"]["content"])
        for choice in choice_chunks(chunks, 0)
        if choice["delta"].get("content") and "role" not in choice["delta"]
    ]


async def test_stamp_is_each_piece_send_time(aiohttp_client: ClientFactory) -> None:
    rate = 20.0
    client = await aiohttp_client(
        build_mock_app(MockSettings(chunks_per_second=rate, stamp=True))
    )
    before = time.monotonic()
    chunks = await stream(
        client, completion_request(max_tokens=3, stream_options={"include_usage": True})
    )
    after = time.monotonic()

    pieces = split_into_chunks(mock_answer(MESSAGES))[:3]
    stamps = stamped_pieces(chunks)
    assert [piece for _, piece in stamps] == pieces
    # Round k is sent no earlier than k/rate after the request: the stamp is taken when the
    # frame is written, not when its round was planned.
    for round_no, (stamp, _) in enumerate(stamps, start=1):
        assert before + round_no / rate - 1e-6 <= stamp <= after
    # The role chunk is not a piece and carries no stamp; the counts are the pieces'.
    assert choice_chunks(chunks, 0)[0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_stamped_answer_is_the_answer_after_the_stamps(
    aiohttp_client: ClientFactory,
) -> None:
    client = await aiohttp_client(
        build_mock_app(MockSettings(chunks_per_second=0, stamp=True))
    )
    chunks = await stream(client, completion_request(n=2))
    for index in (0, 1):
        contents = [
            choice["delta"]["content"]
            for choice in choice_chunks(chunks, index)
            if choice["delta"].get("content")
        ]
        assert "".join(unstamp(content)[1] for content in contents) == mock_answer(
            MESSAGES, choice=index
        )


async def held_count(client: TestClient[Any, Any]) -> int:
    response = await client.get("/control/held")
    assert response.status == 200
    body = orjson.loads(await response.read())
    assert isinstance(body["held"], int)
    return body["held"]


async def release(client: TestClient[Any, Any]) -> int:
    response = await client.post("/control/release")
    assert response.status == 200
    body = orjson.loads(await response.read())
    assert isinstance(body["released"], int)
    return body["released"]


async def test_hold_streams_nothing_until_released(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(
        build_mock_app(MockSettings(chunks_per_second=0, stamp=True, hold=True))
    )
    assert await release(client) == 0  # nothing held yet

    # The headers come at once; the completion is then held.
    response = await client.post("/v1/chat/completions", data=orjson.dumps(completion_request()))
    assert response.status == 200
    assert await held_count(client) == 1
    assert response.content.total_bytes == 0

    released_at = time.monotonic()
    assert await release(client) == 1
    assert await held_count(client) == 0
    chunks, _ = decode_stream(await response.read())
    stamps = stamped_pieces(chunks)
    assert "".join(piece for _, piece in stamps) == mock_answer(MESSAGES)
    assert min(stamp for stamp, _ in stamps) >= released_at

    # A completion that arrives after a release waits for the next one.
    second = await client.post("/v1/chat/completions", data=orjson.dumps(completion_request()))
    assert second.status == 200
    assert await held_count(client) == 1
    assert await release(client) == 1
    chunks, _ = decode_stream(await second.read())
    assert "".join(piece for _, piece in stamped_pieces(chunks)) == mock_answer(MESSAGES)


async def test_release_starts_every_held_completion(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(build_mock_app(MockSettings(chunks_per_second=0, hold=True)))
    responses = [
        await client.post("/v1/chat/completions", data=orjson.dumps(completion_request()))
        for _ in range(3)
    ]
    assert await held_count(client) == 3
    assert await release(client) == 3
    for response in responses:
        chunks, _ = decode_stream(await response.read())
        assert content_of(chunks, 0) == mock_answer(MESSAGES)


async def test_held_completion_whose_client_leaves_is_no_longer_counted(
    aiohttp_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="server.mock")
    signal = _RecordSignal("mock completion chatcmpl-mock-1: cancelled")
    logging.getLogger("server.mock").addHandler(signal)
    try:
        # The test server runs with handler_cancellation, as Chorus's embedded mock does.
        client = await aiohttp_client(
            build_mock_app(MockSettings(chunks_per_second=0, hold=True))
        )
        response = await client.post(
            "/v1/chat/completions", data=orjson.dumps(completion_request())
        )
        assert await held_count(client) == 1
        response.close()
        await asyncio.wait_for(signal.seen.wait(), timeout=10)
        assert await held_count(client) == 0
        assert await release(client) == 0
    finally:
        logging.getLogger("server.mock").removeHandler(signal)


async def test_control_routes_only_with_hold(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(build_mock_app(UNPACED))
    assert (await client.post("/control/release")).status == 404
    assert (await client.get("/control/held")).status == 404
