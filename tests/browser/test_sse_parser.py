"""The dashboard's SSE parser (web/sse-parser.js), run in Chromium, against the server's own
WHATWG decoder (server/sse.py) as the reference: every input fed whole and split at every
point, with LF, CRLF and CR line ends."""

from __future__ import annotations

from typing import Any

import pytest

from server.sse import SSEDecoder

from ..conftest import StartChorus
from ..fake_upstream import FakeUpstream
from .conftest import OpenTab

STREAMS = [
    "retry: 2000\n\nid: 1\nevent: created\ndata: {\"conversation\":\"a\"}\n\n",
    "data: one\ndata: two\n\n: a comment\nid: 7\nevent: stats\ndata:{}\n\n",
    "id: 3\n\nevent: ignored-without-data\n\ndata: after\n\n",
    "data: ünïcödé — 日本語 ✓ 🎵\n\nid: 4\0x\ndata: nul-id-ignored\n\n",
    "event: x\ndata\ndata:  two spaces\nretry: soon\nunknown: field\n\n",
    "data: unterminated at the end\nid: 99\n",
]
LINE_ENDS = {"lf": "\n", "crlf": "\r\n", "cr": "\r"}


def reference(text: str) -> tuple[list[dict[str, str]], int | None, str]:
    """What server/sse.py makes of `text`: the events, the retry hint in force at the end,
    and the last event id."""
    decoder = SSEDecoder()
    events = [
        {"type": event.event, "data": event.data, "id": event.id or ""}
        for event in decoder.feed(text.encode())
    ]
    return events, decoder._retry, decoder.last_event_id or ""


PARSE_AT_EVERY_SPLIT = """async ([text]) => {
  const { SseParser } = await import("/web/sse-parser.js");
  // Split between code points: a TextDecoder never splits one.
  const chars = Array.from(text);
  const results = [];
  for (let split = 0; split <= chars.length; split++) {
    const events = [], retries = [];
    const parser = new SseParser((e) => events.push(e), (ms) => retries.push(ms));
    parser.feed(chars.slice(0, split).join(""));
    parser.feed("");
    parser.feed(chars.slice(split).join(""));
    results.push({ split, events, retry: retries.at(-1) ?? null, lastEventId: parser.lastEventId });
  }
  return results;
}"""


@pytest.mark.parametrize("line_end", sorted(LINE_ENDS))
async def test_the_js_parser_matches_the_reference_at_every_split(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, open_tab: OpenTab, line_end: str
) -> None:
    chorus = await start_chorus()
    tab = await open_tab(str(chorus.server.make_url("/")))
    for stream in STREAMS:
        text = stream.replace("\n", LINE_ENDS[line_end])
        expected_events, expected_retry, expected_last_id = reference(text)
        results: list[dict[str, Any]] = await tab.page.evaluate(PARSE_AT_EVERY_SPLIT, [text])
        assert len(results) == len(text) + 1
        for result in results:
            where = f"{stream!r} split at {result['split']}"
            assert result["events"] == expected_events, where
            assert result["retry"] == expected_retry, where
            assert result["lastEventId"] == expected_last_id, where
