"""What happens to a turn when its last subscriber leaves (`hub.on_no_subscribers`)."""

from __future__ import annotations

import asyncio

import orjson

from .conftest import StartChorus, answer_text, eventually, upstream_tasks
from .fake_upstream import FakeUpstream, Script, answer_script, gated_script


def held_script(pieces: list[str]) -> tuple[asyncio.Event, Script]:
    gate = asyncio.Event()
    return gate, gated_script(gate, pieces, after=1)  # after the first piece


async def test_keep_generating_when_everyone_leaves(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate, script = held_script(["first ", "second"])
    fake_upstream.enqueue(script)
    chorus = await start_chorus()  # default: on_no_subscribers = "keep"
    created = await chorus.create()
    log = chorus.registry.get(created["id"]).log
    viewer = await chorus.subscribe(created["id"])
    await viewer.until(lambda e: e.event == "answer")
    viewer.close()
    await eventually(lambda: log.subscriber_count == 0)
    gate.set()

    await eventually(lambda: not upstream_tasks())
    state = await chorus.state(created["id"])
    assert state["status"] == "done"
    late = await chorus.subscribe(created["id"])
    assert answer_text(await late.until_turn_ends()) == "first second"


async def test_cancel_a_turn_nobody_watches_after_the_grace(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    _gate, script = held_script(["first ", "never"])
    fake_upstream.enqueue(script)
    chorus = await start_chorus(hub={"on_no_subscribers": "cancel", "idle_grace_seconds": 0.2})
    created = await chorus.create()
    log = chorus.registry.get(created["id"]).log
    viewer = await chorus.subscribe(created["id"])
    await viewer.until(lambda e: e.event == "answer")
    viewer.close()

    await eventually(lambda: not upstream_tasks())
    await eventually(lambda: fake_upstream.active == 0)  # the upstream request was closed
    assert log.subscriber_count == 0
    state = await chorus.state(created["id"])
    assert state["status"] == "cancelled"
    assert state["turns"][0]["error"] == {
        "code": "cancelled", "message": "nobody was watching for 0.2 s",
    }
    assert state["turns"][0]["choices"][0]["content"] == "first "


async def test_a_viewer_returning_within_the_grace_keeps_the_turn(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate, script = held_script(["first ", "second"])
    fake_upstream.enqueue(script)
    chorus = await start_chorus(hub={"on_no_subscribers": "cancel", "idle_grace_seconds": 5.0})
    created = await chorus.create()
    conversation = chorus.registry.get(created["id"])
    viewer = await chorus.subscribe(created["id"])
    last = (await viewer.until(lambda e: e.event == "answer"))[-1]
    viewer.close()
    await eventually(lambda: conversation.log.subscriber_count == 0)
    assert conversation._unwatched is not None  # the grace timer runs...
    back = await chorus.subscribe(created["id"], headers={"Last-Event-ID": str(last.id)})
    await eventually(lambda: conversation.log.subscriber_count == 1)
    assert conversation._unwatched is None  # ...and stops when someone is back
    gate.set()

    events = await back.until_turn_ends()
    assert [e.event for e in events] == ["answer", "done"]
    assert orjson.loads(events[0].data)["content"] == "second"


async def test_a_conversation_nobody_ever_watches_is_cancelled(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    _gate, script = held_script(["first ", "never"])
    fake_upstream.enqueue(script)
    chorus = await start_chorus(hub={"on_no_subscribers": "cancel", "idle_grace_seconds": 0.2})
    created = await chorus.create()

    await eventually(lambda: not upstream_tasks())
    state = await chorus.state(created["id"])
    assert state["status"] == "cancelled"


async def test_a_turn_cancelled_before_its_task_ran_still_ends_and_the_next_one_works(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["zero"]), answer_script(["two"]))
    chorus = await start_chorus()
    created = await chorus.create()
    await eventually(lambda: not upstream_tasks())
    registry = chorus.registry
    # The follow-up and the cancel in one loop step: the turn's task never gets to run.
    conversation, turn = registry.follow_up(created["id"], "one")
    await registry.cancel(created["id"])

    state = await chorus.state(created["id"])
    assert [t["status"] for t in state["turns"]] == ["done", "cancelled"]
    assert state["turns"][1]["error"] == {
        "code": "cancelled", "message": "the turn was cancelled before it started",
    }
    response = await chorus.client.post(
        f"/v1/conversations/{created['id']}/messages", json={"content": "two"}
    )
    assert response.status == 202
    stream = await chorus.subscribe(created["id"])
    events = await stream.until_turn_ends(2)
    assert answer_text(events, turn=2) == "two"
    assert turn == 1 and conversation.id == created["id"]
