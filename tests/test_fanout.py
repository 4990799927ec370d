"""Fan-out: one upstream stream, many subscribers, identical bytes, replay and resume."""

from __future__ import annotations

import asyncio

import orjson

from .conftest import StartChorus, answer_text, payloads, upstream_tasks, eventually
from .fake_upstream import FakeUpstream, Script, Send, WaitFor, answer_script, chunk, sse, DONE

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
