"""The pure SSE codec: line splitting, the WHATWG event-stream algorithm, and frame encoding.

Every decoder case is written with LF line endings and also run with CR and CRLF, fed at
once, byte by byte and split at every position: reads may cut anywhere, including between
the CR and LF of a CRLF and inside a multi-byte UTF-8 character.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.sse import (
    LineDecoder,
    LineTooLong,
    ServerSentEvent,
    SSEDecoder,
    encode_comment,
    encode_frame,
)

E = ServerSentEvent
ENDINGS = {"lf": b"\n", "cr": b"\r", "crlf": b"\r\n"}
PROPERTY = settings(max_examples=200, deadline=None)


def with_ending(stream: bytes, ending: bytes) -> bytes:
    """Rewrite an LF-only stream to use `ending`."""
    assert b"\r" not in stream
    return stream.replace(b"\n", ending)


def decode(chunks: Iterable[bytes]) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    assert decoder.flush() == []
    return events


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --- The WHATWG cases -----------------------------------------------------------------------

# (id, stream with LF line endings, events expected after feed + flush)
SPEC_CASES: list[tuple[str, bytes, list[ServerSentEvent]]] = [
    ("empty-stream", b"", []),
    ("simple-data", b"data: hello\n\n", [E("hello")]),
    ("multi-line-data", b"data: a\ndata: b\ndata: c\n\n", [E("a\nb\nc")]),
    ("empty-data-line-in-middle", b"data: a\ndata:\ndata: c\n\n", [E("a\n\nc")]),
    ("two-events", b"data: 1\n\ndata: 2\n\n", [E("1"), E("2")]),
    ("extra-blank-lines-between", b"data: 1\n\n\n\n\ndata: 2\n\n", [E("1"), E("2")]),
    ("event-type", b"event: delta\ndata: x\n\n", [E("x", event="delta")]),
    (
        "event-type-resets-after-dispatch",
        b"event: delta\ndata: 1\n\ndata: 2\n\n",
        [E("1", event="delta"), E("2")],
    ),
    ("last-event-field-wins", b"event: a\nevent: b\ndata: x\n\n", [E("x", event="b")]),
    ("empty-event-type-is-message", b"event:\ndata: x\n\n", [E("x")]),
    ("event-value-with-colon", b"event: a:b\ndata: x\n\n", [E("x", event="a:b")]),
    (
        "id-persists-across-events",
        b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\ndata: d\n\n",
        [E("a", id="1"), E("b", id="1"), E("c", id="2"), E("d", id="2")],
    ),
    (
        "id-line-after-data-still-applies",
        b"data: a\nid: 7\n\n",
        [E("a", id="7")],
    ),
    (
        "id-from-event-without-data-carries-over",
        b"id: 5\n\ndata: a\n\n",
        [E("a", id="5")],
    ),
    (
        "id-with-nul-ignored",
        b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",
        [E("a", id="1"), E("b", id="1")],
    ),
    ("id-with-nul-ignored-first", b"id: \x00\ndata: a\n\n", [E("a")]),
    (
        "empty-id-resets",
        b"id: 1\ndata: a\n\nid:\ndata: b\n\n",
        [E("a", id="1"), E("b", id="")],
    ),
    (
        "bare-id-resets",
        b"id: 1\ndata: a\n\nid\ndata: b\n\n",
        [E("a", id="1"), E("b", id="")],
    ),
    ("id-any-text", b"id: abc def\xe2\x9c\x93\ndata: a\n\n", [E("a", id="abc def\u2713")]),
    ("retry-valid", b"retry: 3000\ndata: a\n\n", [E("a", retry=3000)]),
    ("retry-zero", b"retry: 0\ndata: a\n\n", [E("a", retry=0)]),
    ("retry-no-space", b"retry:25\ndata: a\n\n", [E("a", retry=25)]),
    (
        "retry-carries-over",
        b"retry: 100\ndata: a\n\ndata: b\n\n",
        [E("a", retry=100), E("b", retry=100)],
    ),
    (
        "retry-invalid-keeps-previous",
        b"retry: 100\ndata: a\n\nretry: 2x\ndata: b\n\n",
        [E("a", retry=100), E("b", retry=100)],
    ),
    ("retry-letters", b"retry: soon\ndata: a\n\n", [E("a")]),
    ("retry-negative", b"retry: -1\ndata: a\n\n", [E("a")]),
    ("retry-decimal", b"retry: 1.5\ndata: a\n\n", [E("a")]),
    ("retry-empty", b"retry:\ndata: a\n\n", [E("a")]),
    ("retry-bare", b"retry\ndata: a\n\n", [E("a")]),
    ("retry-second-space-is-not-digit", b"retry:  100\ndata: a\n\n", [E("a")]),
    ("retry-trailing-space", b"retry: 100 \ndata: a\n\n", [E("a")]),
    # U+0663 ARABIC-INDIC DIGIT THREE and U+FF13 FULLWIDTH DIGIT THREE: str.isdigit() says yes.
    ("retry-non-ascii-digits", "retry: \u0663\uff13\ndata: a\n\n".encode(), [E("a")]),
    ("retry-alone-not-dispatched", b"retry: 10\n\n", []),
    ("comment", b": hello\ndata: a\n: in the middle\n\n", [E("a")]),
    ("comment-only", b": ping\n\n", []),
    ("bare-colon-comment", b":\n\n", []),
    ("comment-looks-like-data", b":data: x\n\n", []),
    ("field-without-colon-data", b"data\n\n", [E("")]),
    ("two-bare-data-lines", b"data\ndata\n\n", [E("\n")]),
    ("bare-data-then-value", b"data\ndata: x\n\n", [E("\nx")]),
    ("empty-data-value", b"data:\n\n", [E("")]),
    ("data-space-only", b"data: \n\n", [E("")]),
    ("data-without-space", b"data:value\n\n", [E("value")]),
    ("data-two-spaces-keeps-one", b"data:  two spaces\n\n", [E(" two spaces")]),
    ("data-trailing-space-kept", b"data: x \n\n", [E("x ")]),
    ("data-tab-not-stripped", b"data:\tx\n\n", [E("\tx")]),
    ("data-value-with-colon", b"data: a: b\n\n", [E("a: b")]),
    ("data-with-nul-kept", b"data: a\x00b\n\n", [E("a\x00b")]),
    ("data-json", b'data: {"a": "b\\\\c\\"d"}\n\n', [E('{"a": "b\\\\c\\"d"}')]),
    ("data-done", b"data: [DONE]\n\n", [E("[DONE]")]),
    ("unknown-field-ignored", b"foo: bar\ndata: a\nbaz\n\n", [E("a")]),
    ("field-names-are-case-sensitive", b"Data: a\nDATA: b\ndata: c\n\n", [E("c")]),
    ("field-name-with-trailing-space", b"data : a\ndata \n\n", []),
    ("no-data-not-dispatched", b"event: ping\n\n", []),
    ("id-only-not-dispatched", b"id: 3\n\n", []),
    (
        "undispatched-event-type-resets",
        b"event: ping\n\ndata: x\n\n",
        [E("x")],
    ),
    ("bom-stripped", b"\xef\xbb\xbfdata: a\n\n", [E("a")]),
    ("bom-before-blank-line", b"\xef\xbb\xbf\ndata: a\n\n", [E("a")]),
    ("only-one-bom-stripped", b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n", [E("b")]),
    ("bom-after-start-not-stripped", b"data: a\n\n\xef\xbb\xbfdata: b\n\n", [E("a")]),
    ("bom-in-data-kept", b"data: \xef\xbb\xbfa\n\n", [E("\ufeffa")]),
    ("empty-lines-only", b"\n\n\n\n", []),
    ("utf8", "data: 日本語 😀 «é»\n\n".encode(), [E("日本語 😀 «é»")]),
    ("invalid-utf8-replaced", b"data: a\xffb\xe6\n\n", [E("a\ufffdb\ufffd")]),
    (
        "unicode-line-separators-are-not-line-endings",
        "data: a\u2028b\x85c\x0bd\x0ce\n\n".encode(),
        [E("a\u2028b\x85c\x0bd\x0ce")],
    ),
    ("trailing-event-without-blank-line-dropped", b"data: a\n\ndata: b\n", [E("a")]),
    ("trailing-unterminated-line-dropped", b"data: a\n\ndata: b", [E("a")]),
    ("trailing-multi-line-event-dropped", b"data: a\n\nevent: x\ndata: b\ndata: c\n", [E("a")]),
    (
        "openai-style",
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
        b": keep-alive\n\n"
        b'data: {"choices":[{"delta":{"content":" there"}}]}\n\n'
        b"data: [DONE]\n\n",
        [
            E('{"choices":[{"delta":{"content":"Hi"}}]}'),
            E('{"choices":[{"delta":{"content":" there"}}]}'),
            E("[DONE]"),
        ],
    ),
    (
        "chorus-style",
        b'id: 1\nevent: delta\ndata: {"t":"a"}\n\n'
        b": ping\n\n"
        b'id: 2\nevent: done\ndata: {"turn":0}\n\n'
        b'event: end\ndata: {"reason":"closed"}\n\n',
        [
            E('{"t":"a"}', event="delta", id="1"),
            E('{"turn":0}', event="done", id="2"),
            E('{"reason":"closed"}', event="end", id="2"),
        ],
    ),
]
SPEC_IDS = [case[0] for case in SPEC_CASES]
SPEC_PARAMS = [pytest.param(stream, expected, id=name) for name, stream, expected in SPEC_CASES]
ENDING_PARAMS = [pytest.param(ending, id=name) for name, ending in ENDINGS.items()]


def test_spec_case_ids_are_unique() -> None:
    assert len(set(SPEC_IDS)) == len(SPEC_IDS)


@pytest.mark.parametrize("ending", ENDING_PARAMS)
@pytest.mark.parametrize(("stream", "expected"), SPEC_PARAMS)
def test_spec_case_fed_at_once(
    stream: bytes, expected: list[ServerSentEvent], ending: bytes
) -> None:
    assert decode([with_ending(stream, ending)]) == expected


@pytest.mark.parametrize("ending", ENDING_PARAMS)
@pytest.mark.parametrize(("stream", "expected"), SPEC_PARAMS)
def test_spec_case_fed_byte_by_byte(
    stream: bytes, expected: list[ServerSentEvent], ending: bytes
) -> None:
    assert decode(byte_by_byte(with_ending(stream, ending))) == expected


@pytest.mark.parametrize("ending", ENDING_PARAMS)
@pytest.mark.parametrize(("stream", "expected"), SPEC_PARAMS)
def test_spec_case_split_at_every_point(
    stream: bytes, expected: list[ServerSentEvent], ending: bytes
) -> None:
    data = with_ending(stream, ending)
    for cut in range(len(data) + 1):
        assert decode(split_at(data, [cut])) == expected, f"split at {cut}: {data[:cut]!r}"


def test_empty_reads_change_nothing() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"") == []
    # The held CR is still followed by this LF: CRLF, not CR then an empty line.
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\r\n") == [E("a")]


# Streams whose every pair of split points is tried: CR/LF pairs across reads, events
# ending exactly at a read boundary, and the BOM split.
PAIR_STREAMS = [
    pytest.param(b"\xef\xbb\xbfid: 1\nevent: a\ndata: x\ndata:\n\n: c\ndata: y\n\n", id="mixed"),
    pytest.param(b"\n\ndata\n\n\ndata: \n\n", id="blank-lines"),
    pytest.param("data: 日本😀\nid: é\n\n".encode(), id="utf8"),
]


@pytest.mark.parametrize("ending", ENDING_PARAMS)
@pytest.mark.parametrize("stream", PAIR_STREAMS)
def test_every_pair_of_split_points(stream: bytes, ending: bytes) -> None:
    data = with_ending(stream, ending)
    expected = decode([data])
    assert expected  # the stream must say something, or the comparison proves nothing
    for first in range(len(data) + 1):
        for second in range(first, len(data) + 1):
            assert decode(split_at(data, [first, second])) == expected, (first, second)


def test_mixed_line_endings_in_one_stream() -> None:
    data = b"data: a\rdata: b\r\ndata: c\n\r\ndata: d\n\r\r\n\n"
    expected = [E("a\nb\nc"), E("d")]
    assert decode([data]) == expected
    assert decode(byte_by_byte(data)) == expected


def test_lf_cr_is_two_line_endings_not_one() -> None:
    # "\n\r" is LF then CR: an empty line between them, so the event is dispatched.
    assert decode([b"data: a\n\rdata: b\n\n"]) == [E("a"), E("b")]


@pytest.mark.parametrize("text", ["日本", "😀", "é", "日😀é"], ids=["cjk", "emoji", "latin", "mixed"])
@pytest.mark.parametrize("ending", ENDING_PARAMS)
def test_multibyte_utf8_split_inside_a_character(text: str, ending: bytes) -> None:
    data = with_ending(f"id: {text}\nevent: {text}\ndata: {text}\n\n".encode(), ending)
    expected = [E(text, event=text, id=text)]
    for cut in range(len(data) + 1):
        assert decode(split_at(data, [cut])) == expected, cut
    assert decode(byte_by_byte(data)) == expected


def test_events_are_returned_by_the_read_that_completes_them() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\ndata: b\n\nda") == [E("a"), E("b")]
    assert decoder.feed(b"ta: c\r") == []
    # The blank line is complete at its CR; the decoder does not wait to see an LF.
    assert decoder.feed(b"\r") == [E("c")]
    assert decoder.feed(b"\n") == []


def test_last_event_id_follows_dispatches() -> None:
    decoder = SSEDecoder()
    assert decoder.last_event_id is None
    assert decoder.feed(b"id: 1\ndata: a\n\n") == [E("a", id="1")]
    assert decoder.last_event_id == "1"
    assert decoder.feed(b"id: 2\n\n") == []
    assert decoder.last_event_id == "2"
    assert decoder.feed(b"id\n\n") == []
    assert decoder.last_event_id == ""


def test_id_of_an_event_cut_off_at_end_of_stream_is_discarded() -> None:
    # Resuming from last_event_id must not skip the event that never arrived whole.
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n") == [E("a", id="1")]
    assert decoder.last_event_id == "1"
    assert decoder.flush() == []
    assert decoder.last_event_id == "1"


def test_unterminated_id_line_at_end_of_stream_is_discarded() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 1\ndata: a\n\nid: 2") == [E("a", id="1")]
    assert decoder.flush() == []
    assert decoder.last_event_id == "1"


def test_flush_drops_the_pending_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: x\ndata: a\n") == []
    assert decoder.flush() == []
    # Nothing of the dropped event leaks into a later one.
    assert decoder.feed(b"data: b\n\n") == [E("b")]


# --- LineDecoder ----------------------------------------------------------------------------


def reference_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines of `data` and its unterminated rest, splitting the whole at once.

    A CR at the very end counts as a complete line ending, as LineDecoder emits it at once.
    """
    *lines, rest = re.split(rb"\r\n|\r|\n", data)
    return lines, rest


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        pytest.param([b"a\nb\n"], [[b"a", b"b"]], id="lf"),
        pytest.param([b"a\rb\r"], [[b"a", b"b"]], id="cr"),
        pytest.param([b"a\r\nb\r\n"], [[b"a", b"b"]], id="crlf"),
        pytest.param([b"a\r", b"\nb\n"], [[b"a"], [b"b"]], id="crlf-split"),
        pytest.param([b"a\r", b"\n"], [[b"a"], []], id="crlf-split-lf-alone"),
        pytest.param([b"a\r", b"", b"\nb\n"], [[b"a"], [], [b"b"]], id="crlf-split-empty-read"),
        pytest.param([b"a\r", b"\rb\n"], [[b"a"], [b"", b"b"]], id="cr-then-cr"),
        pytest.param([b"a\r", b"\r\n"], [[b"a"], [b""]], id="cr-then-crlf"),
        pytest.param([b"a\r", b"b\r", b"\n"], [[b"a"], [b"b"], []], id="cr-then-text"),
        pytest.param([b"\r\r\n\n\r"], [[b"", b"", b"", b""]], id="only-endings"),
        pytest.param([b"\n\r"], [[b"", b""]], id="lf-cr-is-two"),
        pytest.param([b"ab", b"c", b"d\ne"], [[], [], [b"abcd"]], id="line-across-reads"),
        pytest.param([b"\xe6\x97", b"\xa5\n"], [[], ["日".encode()]], id="utf8-split"),
    ],
)
def test_line_decoder_cases(chunks: list[bytes], expected: list[list[bytes]]) -> None:
    decoder = LineDecoder()
    assert [decoder.feed(chunk) for chunk in chunks] == expected


def test_line_decoder_flush_returns_the_unterminated_line_once() -> None:
    decoder = LineDecoder()
    assert decoder.feed(b"a\nbc") == [b"a"]
    assert decoder.flush() == [b"bc"]
    assert decoder.flush() == []


def test_line_decoder_flush_after_held_cr_returns_nothing() -> None:
    decoder = LineDecoder()
    assert decoder.feed(b"a\r") == [b"a"]
    assert decoder.flush() == []


# Byte strings rich in line endings, and the multi-byte characters that reads may cut.
line_bytes = st.lists(
    st.one_of(
        st.sampled_from(
            [b"\r", b"\n", b"\r\n", b"\n\r", b"a", b"\xe6\x97\xa5", b"\xf0\x9f\x98\x80"]
        ),
        st.binary(max_size=6),
    ),
    max_size=40,
).map(b"".join)


@PROPERTY
@given(data=line_bytes, draw=st.data())
def test_line_decoder_any_split_equals_splitting_the_whole(
    data: bytes, draw: st.DataObject
) -> None:
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=12), label="cuts")
    decoder = LineDecoder()
    lines: list[bytes] = []
    fed = b""
    for chunk in split_at(data, cuts):
        lines += decoder.feed(chunk)
        fed += chunk
        # Prompt: every line complete so far has been returned, and nothing more.
        assert lines == reference_lines(fed)[0]
    lines += decoder.flush()
    complete, rest = reference_lines(data)
    assert lines == complete + ([rest] if rest else [])


@PROPERTY
@given(data=line_bytes)
def test_line_decoder_byte_by_byte_equals_splitting_the_whole(data: bytes) -> None:
    decoder = LineDecoder()
    lines: list[bytes] = []
    for chunk in byte_by_byte(data):
        lines += decoder.feed(chunk)
    lines += decoder.flush()
    complete, rest = reference_lines(data)
    assert lines == complete + ([rest] if rest else [])


# --- Round trips of random event streams ----------------------------------------------------

# Text without line breaks, biased towards what breaks parsers: CJK, emoji, quotes,
# backslashes, colons, leading spaces, NUL, BOM, and Unicode line separators (which are
# not SSE line endings).
line_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_characters="\r\n"),
        st.sampled_from(list("日本語😀🎉\"'\\: \t\x00\ufeff\u2028\x85{}")),
    ),
    max_size=12,
)
id_text = line_text.map(lambda s: s.replace("\x00", ""))


@st.composite
def sse_events(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "data": "\n".join(draw(st.lists(line_text, min_size=1, max_size=4))),
        "event": draw(st.none() | line_text),
        "id": draw(st.none() | id_text),
        "retry": draw(st.none() | st.integers(0, 10**12)),
        "comment": draw(st.none() | line_text),
    }


def encode_events(events: Sequence[dict[str, Any]], ending: bytes, *, bom: bool) -> bytes:
    """A test-side encoder, independent of encode_frame, that writes every field kind."""
    lines: list[str] = []
    for event in events:
        if event["comment"] is not None:
            lines.append(":" + event["comment"])
        if event["id"] is not None:
            lines.append("id: " + event["id"])
        if event["event"] is not None:
            lines.append("event: " + event["event"])
        if event["retry"] is not None:
            lines.append(f"retry: {event['retry']}")
        lines += ["data: " + line for line in event["data"].split("\n")]
        lines.append("")
    return (b"\xef\xbb\xbf" if bom else b"") + b"".join(line.encode() + ending for line in lines)


def expected_events(events: Sequence[dict[str, Any]]) -> list[ServerSentEvent]:
    expected: list[ServerSentEvent] = []
    last_id: str | None = None
    retry: int | None = None
    for event in events:
        last_id = event["id"] if event["id"] is not None else last_id
        retry = event["retry"] if event["retry"] is not None else retry
        name = event["event"] or "message"
        expected.append(E(event["data"], event=name, id=last_id, retry=retry))
    return expected


@PROPERTY
@given(
    events=st.lists(sse_events(), max_size=6),
    ending=st.sampled_from(list(ENDINGS.values())),
    bom=st.booleans(),
    draw=st.data(),
)
def test_random_events_survive_any_split(
    events: list[dict[str, Any]], ending: bytes, bom: bool, draw: st.DataObject
) -> None:
    data = encode_events(events, ending, bom=bom)
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=20), label="cuts")
    expected = expected_events(events)
    decoder = SSEDecoder()
    decoded: list[ServerSentEvent] = []
    for chunk in split_at(data, cuts):
        decoded += decoder.feed(chunk)
    assert decoder.flush() == []
    assert decoded == expected
    assert decoder.last_event_id == (expected[-1].id if expected else None)


@PROPERTY
@given(
    events=st.lists(sse_events(), min_size=1, max_size=4),
    ending=st.sampled_from(list(ENDINGS.values())),
    cut=st.integers(1, 10**6),
)
def test_random_stream_cut_short_drops_only_the_unfinished_event(
    events: list[dict[str, Any]], ending: bytes, cut: int
) -> None:
    data = encode_events(events, ending, bom=False)
    cut = cut % len(data)
    # An event is complete once its blank line has ended; with CRLF the CR alone ends it.
    completed_at = [
        len(encode_events(events[: i + 1], ending, bom=False)) - len(ending) + 1
        for i in range(len(events))
    ]
    complete = sum(1 for end in completed_at if end <= cut)
    assert complete < len(events) or ending == b"\r\n"
    assert decode([data[:cut]]) == expected_events(events)[:complete]


# --- encode_frame and encode_comment --------------------------------------------------------


def test_encode_frame_exact_bytes() -> None:
    assert encode_frame(event="delta", data=b'{"t":"hi"}', id=7) == (
        b'id: 7\nevent: delta\ndata: {"t":"hi"}\n\n'
    )


def test_end_frame_without_id_has_no_id_line() -> None:
    frame = encode_frame(event="end", data=b'{"reason":"done"}')
    assert frame == b'event: end\ndata: {"reason":"done"}\n\n'
    assert b"id:" not in frame
    assert decode([frame]) == [E('{"reason":"done"}', event="end")]


def test_frame_without_id_keeps_the_previous_id() -> None:
    # The end frame carries no id, so a client resuming after it sends the last real seq.
    stream = encode_frame(event="delta", data=b"{}", id=41) + encode_frame(event="end", data=b"{}")
    assert decode([stream]) == [E("{}", event="delta", id="41"), E("{}", event="end", id="41")]


@pytest.mark.parametrize(
    "data",
    [b"a\nb", b"a\rb", b"a\r\nb", b"\n", b"\r", b"a\n"],
    ids=["lf", "cr", "crlf", "lf-alone", "cr-alone", "trailing-lf"],
)
def test_encode_frame_refuses_line_breaks_in_data(data: bytes) -> None:
    with pytest.raises(ValueError, match="single line"):
        encode_frame(event="delta", data=data, id=1)
    with pytest.raises(ValueError, match="single line"):
        encode_frame(event="end", data=data)


def test_encode_comment() -> None:
    assert encode_comment("ping") == b": ping\n\n"
    assert decode([encode_comment("ping") + b"data: a\n\n"]) == [E("a")]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | line_text
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@PROPERTY
@given(
    frames=st.lists(
        st.tuples(
            st.sampled_from(["delta", "done", "snapshot", "error", "turn", "日本", "a:b"]),
            json_values,
            st.none() | st.integers(0, 2**63 - 1),
        ),
        min_size=1,
        max_size=5,
    ),
    draw=st.data(),
)
def test_encode_frame_round_trip(
    frames: list[tuple[str, Any, int | None]], draw: st.DataObject
) -> None:
    stream = b"".join(
        encode_frame(event=event, data=orjson.dumps(obj), id=seq) for event, obj, seq in frames
    )
    cuts = draw.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts")
    decoded = decode(split_at(stream, cuts))
    assert [e.event for e in decoded] == [event for event, _, _ in frames]
    assert [orjson.loads(e.data) for e in decoded] == [obj for _, obj, _ in frames]
    last_id: str | None = None
    for event, (_, _, seq) in zip(decoded, frames):
        last_id = str(seq) if seq is not None else last_id
        assert event.id == last_id
        assert event.retry is None


def test_an_unterminated_line_past_the_bound_is_refused() -> None:
    decoder = LineDecoder(max_line_bytes=16)
    assert decoder.feed(b"data: short\n") == [b"data: short"]
    with pytest.raises(LineTooLong):
        decoder.feed(b"data: " + b"x" * 20)


def test_a_long_line_within_the_bound_across_reads_is_kept() -> None:
    decoder = LineDecoder(max_line_bytes=64)
    assert decoder.feed(b"a" * 40) == []
    assert decoder.feed(b"b" * 20 + b"\n") == [b"a" * 40 + b"b" * 20]


@pytest.mark.parametrize("bad", ["a\nb", "a\rb"])
def test_event_names_and_comments_with_line_breaks_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        encode_frame(event=bad, data=b"{}")
    with pytest.raises(ValueError):
        encode_comment(bad)
