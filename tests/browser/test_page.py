"""The viewer page in real headless Chromium: ask, stream, share, catch up, follow up, stop,
reconnect, and render hostile text as text. See conftest.py for the browser fixtures."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any
from urllib.parse import parse_qs, urlsplit

from server.app import create_app
from server.config import MockSettingsSection
from server.mock import mock_answer, split_into_chunks

from ..conftest import Chorus, StartChorus, eventually, make_settings
from ..fake_upstream import (
    DONE,
    FakeUpstream,
    Hang,
    Script,
    Send,
    Step,
    WaitFor,
    answer_script,
    chunk,
    sse,
    usage_chunk,
)
from .conftest import OpenTab, Tab

QUESTION = "How does fan-out work?"
# The mock upstream's answer: prose, a markdown list, a fenced code block, non-ASCII text.
ANSWER = mock_answer([{"role": "user", "content": QUESTION}])
PIECES = split_into_chunks(ANSWER)


def held_script(pieces: list[str], *gates: tuple[int, asyncio.Event]) -> Script:
    """An answer that stops before piece `i` until its gate is set, for each (i, gate)."""
    held = dict(gates)
    steps: list[Step] = [Send(sse(chunk(role="assistant", content="")))]
    for index, piece in enumerate(pieces):
        if index in held:
            steps.append(WaitFor(held[index]))
        steps.append(Send(sse(chunk(content=piece))))
    steps += [Send(sse(chunk(finish_reason="stop"))), Send(sse(usage_chunk())), Send(DONE)]
    return Script(steps)


async def ask(tab: Tab, question: str) -> str:
    """Type a question, press Ask, and return the new conversation's id (from the URL the
    page switches to, which is also its share link)."""
    await tab.page.fill("#prompt", question)
    await tab.page.click("#ask")
    await tab.wait_until("() => new URL(location.href).searchParams.has('c')", what="a share link")
    conversation_id = parse_qs(urlsplit(tab.page.url).query)["c"][0]
    assert await tab.page.get_attribute("#share-link", "href") == tab.page.url
    return conversation_id


def page_url(chorus: Chorus, conversation_id: str | None = None) -> str:
    url = str(chorus.server.make_url("/"))
    return f"{url}?c={conversation_id}" if conversation_id else url


async def test_tabs_share_one_answer_and_a_late_tab_catches_up(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, open_tab: OpenTab
) -> None:
    """Two tabs from the start and a third opened mid-answer end with the upstream's exact
    text, from one upstream request; "N watching" follows the tabs."""
    chorus = await start_chorus()
    before_content, mid_answer = asyncio.Event(), asyncio.Event()
    fake_upstream.enqueue(held_script(PIECES, (0, before_content), (20, mid_answer)))

    first = await open_tab(page_url(chorus))
    conversation_id = await ask(first, QUESTION)
    second = await open_tab(page_url(chorus, conversation_id))
    for tab in (first, second):
        await tab.wait_for_turn_status("streaming")
        await tab.wait_for_text("#status", "live")
        await tab.wait_for_text("#watching", "2")
        # The prompt shows in the tab that asked and in the one that followed the link.
        await tab.wait_for_text('article.turn[data-turn="0"] .prompt-text', QUESTION)

    before_content.set()
    partial = "".join(PIECES[:20])
    for tab in (first, second):
        await tab.wait_for_answer(partial)

    third = await open_tab(page_url(chorus, conversation_id))
    await third.wait_for_answer(partial)
    for tab in (first, second, third):
        await tab.wait_for_text("#watching", "3")

    mid_answer.set()
    for tab in (first, second, third):
        await tab.wait_for_turn_status("done")
        assert await tab.answer() == ANSWER
    assert fake_upstream.calls == 1
    # The code block is a <pre><code>, its body exactly the code (fence lines kept aside).
    code = await third.page.text_content('article.turn[data-turn="0"] pre.code-block code')
    assert code == ANSWER.split("```python\n", 1)[1].split("```", 1)[0]
    assert await first.page.is_hidden("#stop")
    await first.screenshot("page-two-tabs-answer.png")


async def test_a_tab_opened_after_the_answer_shows_it_whole(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, open_tab: OpenTab
) -> None:
    chorus = await start_chorus()
    fake_upstream.enqueue(answer_script(PIECES))
    created = await chorus.create(messages=[{"role": "user", "content": QUESTION}])
    await eventually(lambda: chorus.registry.get(created["id"]).status == "done")

    late = await open_tab(page_url(chorus, created["id"]))
    await late.wait_for_turn_status("done")
    assert await late.answer() == ANSWER
    await late.wait_for_text('article.turn[data-turn="0"] .prompt-text', QUESTION)
    await late.wait_for_text("#watching", "1")
    assert await late.page.text_content("#status") == "live"
    # Offline by design: the mock notice is driven by /v1/info (the fake upstream is no mock).
    assert await late.page.is_hidden("#mock-notice")


async def test_follow_up_and_stop_reach_every_tab(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, open_tab: OpenTab
) -> None:
    chorus = await start_chorus()
    fake_upstream.enqueue(
        answer_script(["First ", "answer."]),
        answer_script(["Second ", "answer."]),
        Script([Send(sse(chunk(role="assistant", content="Thinking"))), Hang()]),
    )
    asker = await open_tab(page_url(chorus))
    conversation_id = await ask(asker, "one")
    watcher = await open_tab(page_url(chorus, conversation_id))
    for tab in (asker, watcher):
        await tab.wait_for_turn_status("done")
        assert await tab.answer() == "First answer."

    # A follow-up from the tab that follows the link: every tab shows it, prompt included.
    await watcher.page.fill("#prompt", "two")
    await watcher.page.click("#ask")
    for tab in (asker, watcher):
        await tab.wait_for_turn_status("done", turn=1)
        assert await tab.answer(turn=1) == "Second answer."
        await tab.wait_for_text('article.turn[data-turn="1"] .prompt-text', "two")

    await asker.page.fill("#prompt", "three")
    await asker.page.click("#ask")
    for tab in (asker, watcher):
        await tab.wait_for_answer("Thinking", turn=2)
        await tab.wait_until("() => !document.querySelector('#stop').hidden", what="Stop shown")
        assert await tab.page.is_disabled("#ask")
    await watcher.page.click("#stop")
    for tab in (asker, watcher):
        await tab.wait_for_turn_status("error", turn=2)
        error = await tab.page.text_content('article.turn[data-turn="2"] .turn-error')
        assert error is not None and error.startswith("Stopped"), error
        assert await tab.answer(turn=2) == "Thinking"
        await tab.wait_until("() => document.querySelector('#stop').hidden", what="Stop hidden")
        assert await tab.page.is_enabled("#ask")
    assert chorus.registry.get(conversation_id).status == "cancelled"
    assert len(fake_upstream.requests) == 3


def abort_event_streams(chorus: Chorus) -> int:
    """Abort, on the server side, every connection currently serving an events stream."""
    aborted = 0
    assert chorus.server.runner is not None and chorus.server.runner.server is not None
    for handler in list(chorus.server.runner.server.connections):
        request: Any = handler._current_request
        if request is not None and request.path.endswith("/events") and handler.transport:
            handler.transport.abort()
            aborted += 1
    return aborted


async def test_a_dropped_stream_resumes_with_nothing_lost(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, open_tab: OpenTab
) -> None:
    """The server drops the tab's SSE connection mid-answer; the rest of the answer is
    published while it is away. EventSource reconnects with Last-Event-ID; the page says
    so and ends with the whole answer, nothing missing and nothing twice."""
    # A one-second retry hint: long enough to publish while the tab is away.
    chorus = await start_chorus(hub={"retry_hint_ms": 1000})
    gate = asyncio.Event()
    fake_upstream.enqueue(held_script(PIECES, (10, gate)))
    tab = await open_tab(page_url(chorus))
    conversation_id = await ask(tab, QUESTION)
    await tab.wait_for_answer("".join(PIECES[:10]))
    await tab.wait_for_text("#status", "live")
    # The turn event and ten answer events.
    last_seen = chorus.registry.get(conversation_id).log.last_seq
    assert last_seen == 11

    assert abort_event_streams(chorus) == 1
    await tab.wait_for_text("#status", "reconnecting…")
    await tab.wait_for_text("#connection-note", f"connection lost after event {last_seen}")
    gate.set()
    await eventually(lambda: chorus.registry.get(conversation_id).status == "done")

    await tab.wait_for_text("#status", "live")
    await tab.wait_for_text("#connection-note", f"resumed after event {last_seen}, nothing lost")
    await tab.wait_for_turn_status("done")
    assert await tab.answer() == ANSWER
    assert await tab.page.get_attribute("#status", "data-reconnects") == "1"
    await tab.screenshot("page-resumed.png")


HOSTILE = [
    'Look: <img src=x onerror="alert(1)"> and ',
    "<script>alert(2)</script>",
    ' <b>bold?</b> <iframe src="javascript:alert(3)"></iframe>',
]


async def test_html_in_answers_and_prompts_is_shown_as_text(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, open_tab: OpenTab
) -> None:
    chorus = await start_chorus()
    fake_upstream.enqueue(answer_script(HOSTILE))
    tab = await open_tab(page_url(chorus))
    question = '<img src=y onerror="alert(4)"><script>alert(5)</script>'
    conversation_id = await ask(tab, question)
    await tab.wait_for_turn_status("done")
    viewer = await open_tab(page_url(chorus, conversation_id))
    await viewer.wait_for_turn_status("done")
    for each in (tab, viewer):
        assert await each.answer() == "".join(HOSTILE)
        await each.wait_for_text('article.turn[data-turn="0"] .prompt-text', question)
        created = await each.page.evaluate(
            "() => ({images: document.querySelectorAll('img').length,"
            " iframes: document.querySelectorAll('iframe').length,"
            " bold: document.querySelectorAll('main b').length,"
            " scripts: [...document.scripts].map(s => new URL(s.src, location.href).pathname)})"
        )
        assert created == {"images": 0, "iframes": 0, "bold": 0, "scripts": ["/web/app.js"]}
        assert each.dialogs == []
    await viewer.screenshot("page-hostile-text.png")


async def test_the_page_is_served_under_a_strict_csp(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, open_tab: OpenTab
) -> None:
    """The page runs under its CSP with no violation: no inline script or style anywhere."""
    chorus = await start_chorus()
    for path in ("/", "/dashboard"):
        response = await chorus.client.get(path)
        assert response.status == 200
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        html = await response.text()
        assert " style=" not in html and "<style" not in html
        assert "<script>" not in html
    tab = await open_tab(page_url(chorus))
    await tab.wait_until("() => document.querySelector('#server-info').textContent !== ''",
                         what="server info")


async def test_the_embedded_mock_answers_offline(aiohttp_server: Any, open_tab: OpenTab) -> None:
    """`make run` with no key: the page says the mock answers, and shows its exact answer."""
    settings = dataclasses.replace(
        make_settings("https://api.openai.com/v1"),
        use_mock=True,
        mock=MockSettingsSection(chunks_per_second=500.0),
    )
    server = await aiohttp_server(create_app(settings))
    tab = await open_tab(str(server.make_url("/")))
    await tab.wait_until(
        "() => !document.querySelector('#mock-notice').hidden", what="the mock notice"
    )
    await ask(tab, QUESTION)
    await tab.wait_for_turn_status("done")
    assert await tab.answer() == ANSWER
    await tab.screenshot("page-mock-answer.png")
