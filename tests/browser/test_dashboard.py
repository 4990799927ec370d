"""The dashboard (`/dashboard`) in real headless Chromium, fed by the firehose
(`GET /v1/events?all=1`): rows, subscriber counts, totals, the inline answer pane."""

from __future__ import annotations

import asyncio

import pytest

from ..conftest import StartChorus, eventually
from ..fake_upstream import FakeUpstream
from .conftest import OpenTab, Tab
from .test_page import held_script, page_url


def cell(conversation_id: str, column: str) -> str:
    return f'tr[data-conversation="{conversation_id}"] td[data-col="{column}"]'


async def wait_for_row_gone(dashboard: Tab, conversation_id: str) -> None:
    await dashboard.wait_until(
        "(id) => document.querySelector(`tr[data-conversation=\"${id}\"]`) === null",
        conversation_id, what=f"row {conversation_id} removed",
    )


async def test_dashboard_shows_conversations_with_their_subscribers(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, open_tab: OpenTab
) -> None:
    chorus = await start_chorus()
    gate_a, gate_b = asyncio.Event(), asyncio.Event()
    fake_upstream.scripts_by_prompt = {
        "alpha": held_script(["Alpha ", "<b>one</b> ", "done."], (1, gate_a)),
        "beta": held_script(["Beta ", "two."], (1, gate_b)),
    }
    a = (await chorus.create(messages=[{"role": "user", "content": "alpha"}]))["id"]
    b = (await chorus.create(messages=[{"role": "user", "content": "beta"}]))["id"]
    # Two SSE subscribers on A, one on B, plus a viewer page on B: 2 and 2.
    streams = [await chorus.subscribe(a), await chorus.subscribe(a), await chorus.subscribe(b)]
    viewer = await open_tab(page_url(chorus, b))
    await viewer.wait_for_answer("Beta ")

    dashboard = await open_tab(str(chorus.server.make_url("/dashboard")))
    await dashboard.wait_for_text("#status", "live")
    for conversation_id in (a, b):
        await dashboard.wait_for_text(cell(conversation_id, "subscribers"), "2")
        await dashboard.wait_for_text(cell(conversation_id, "status"), "streaming")
        await dashboard.wait_for_text(cell(conversation_id, "model"), "test-model")
        await dashboard.wait_for_text(cell(conversation_id, "chunks"), "1")
    await dashboard.wait_for_text("#total-live", "2")
    await dashboard.wait_for_text("#total-conversations", "2")
    await dashboard.wait_for_text("#total-subscribers", "4")
    # Newest first.
    order = await dashboard.page.eval_on_selector_all(
        "#conversation-rows tr", "rows => rows.map(r => r.dataset.conversation)"
    )
    assert order == [b, a]

    # Click A: the inline pane replays its answer so far, as text, then follows it live.
    await dashboard.page.click(f'tr[data-conversation="{a}"]')
    await dashboard.wait_for_text("#watch-id", a)
    await dashboard.wait_for_text('#watch-turns [data-turn="0"] .watch-answer', "Alpha ")
    assert await dashboard.page.get_attribute("#watch-open", "href") == f"/?c={a}"
    gate_a.set()
    await dashboard.wait_for_text(
        '#watch-turns [data-turn="0"] .watch-answer', "Alpha <b>one</b> done."
    )
    await dashboard.wait_for_text(cell(a, "status"), "done")
    await dashboard.wait_for_text(cell(a, "chunks"), "3")
    await dashboard.wait_for_text("#total-live", "1")
    assert await dashboard.page.locator("#watch-pane b").count() == 0
    # The pane is one more subscriber of A.
    await dashboard.wait_for_text(cell(a, "subscribers"), "3")
    await dashboard.screenshot("dashboard.png")

    # Subscribers leave: the counts follow.
    streams[0].close()
    await viewer.page.close()
    await dashboard.wait_for_text(cell(a, "subscribers"), "2")
    await dashboard.wait_for_text(cell(b, "subscribers"), "1")
    await dashboard.wait_for_text("#total-subscribers", "3")

    # A deleted conversation leaves the table.
    gate_b.set()
    await eventually(lambda: chorus.registry.get(b).status == "done")
    response = await chorus.client.delete(f"/v1/conversations/{b}")
    assert response.status == 204
    await wait_for_row_gone(dashboard, b)
    await dashboard.wait_for_text("#total-conversations", "1")
    for stream in streams[1:]:
        stream.close()


API_KEY = "dashboard-test-key-0123456789abcdef"


async def test_dashboard_asks_for_an_api_key_when_the_firehose_needs_one(
    start_chorus: StartChorus,
    fake_upstream: FakeUpstream,
    open_tab: OpenTab,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With API keys configured the firehose answers 401 to a request without one: the
    dashboard says so, takes a key, and reads the stream with `Authorization` (which an
    EventSource could not send); the inline pane then watches through the multiplexed
    stream with the same key."""
    monkeypatch.setenv("CHORUS_API_KEYS", API_KEY)
    chorus = await start_chorus()
    gate = asyncio.Event()
    fake_upstream.enqueue(held_script(["Keyed ", "answer."], (1, gate)))
    response = await chorus.client.post(
        "/v1/conversations",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert response.status == 201
    conversation_id = (await response.json())["id"]

    dashboard = await open_tab(str(chorus.server.make_url("/dashboard")))
    await dashboard.wait_for_text("#status", "disconnected")
    await dashboard.wait_until(
        "() => !document.querySelector('#api-key-form').hidden", what="the API key field"
    )
    await dashboard.wait_for_text("#dashboard-error", "The firehose needs an API key: enter it.")
    await dashboard.page.fill("#api-key", API_KEY)
    await dashboard.page.click("#api-key-form button")
    await dashboard.wait_for_text("#status", "live")
    await dashboard.wait_for_text(cell(conversation_id, "status"), "streaming")
    assert await dashboard.page.is_hidden("#dashboard-error")

    await dashboard.page.click(f'tr[data-conversation="{conversation_id}"]')
    await dashboard.wait_for_text('#watch-turns [data-turn="0"] .watch-answer', "Keyed ")
    await dashboard.wait_for_text(cell(conversation_id, "subscribers"), "1")
    gate.set()
    await dashboard.wait_for_text('#watch-turns [data-turn="0"] .watch-answer', "Keyed answer.")
    await dashboard.wait_for_text(cell(conversation_id, "status"), "done")
