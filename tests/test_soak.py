"""A bounded soak: churn of subscribers while conversations start, finish and are cancelled.

Hundreds of subscribers connect to random conversations and either stay to the end of the
turn or leave at a random point, while conversations are being started, streamed (paced,
as a model would) and some cancelled. Every subscriber that stayed must have assembled
exactly the upstream's text (or, for a cancelled turn, exactly what the state says was
produced), and afterwards tasks, cursors and file descriptors are back to baseline.
Seconds, not minutes: every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random

import aiohttp

from server.hub import MemoryCursor
from server.sse import ServerSentEvent

from .conftest import (
    EventStream,
    StartChorus,
    assembled_answer,
    eventually,
    turn_has_ended,
    upstream_tasks,
)
from .fake_upstream import FakeUpstream, answer_script

CONVERSATIONS = 12
SUBSCRIBERS = 300
PIECES = 40




async def test_soak_subscribers_come_and_go_while_conversations_run(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    rng = random.Random(20261124)
    expected: dict[str, str] = {}
    prompts = [f"soak question {k}" for k in range(CONVERSATIONS)]
    for k, prompt in enumerate(prompts):
        pieces = [f"c{k}/{i} «{rng.randint(0, 999)}» " for i in range(PIECES)]
        expected[prompt] = "".join(pieces)
        fake_upstream.scripts_by_prompt[prompt] = answer_script(
            pieces, pace=rng.uniform(0.005, 0.03)
        )
    chorus = await start_chorus(hub={"buffer_events": 16})  # small: some will need snapshots
    gc.collect()
    tasks_before = len(asyncio.all_tasks())
    fds_before = len(os.listdir("/proc/self/fd"))

    conversation_ids: list[str] = []
    prompt_of: dict[str, str] = {}
    stayed: list[tuple[str, list[ServerSentEvent]]] = []
    left = 0

    async def start_conversations(session: aiohttp.ClientSession) -> None:
        for prompt in prompts:
            response = await session.post(
                chorus.server.make_url("/v1/conversations"),
                json={"messages": [{"role": "user", "content": prompt}]},
            )
            assert response.status == 201
            created = await response.json()
            conversation_ids.append(created["id"])
            prompt_of[created["id"]] = prompt
            await asyncio.sleep(rng.uniform(0, 0.05))  # arrivals spread over time

    async def cancel_some(session: aiohttp.ClientSession) -> None:
        for _ in range(3):
            await eventually(lambda: len(conversation_ids) >= 4)
            victim = rng.choice(conversation_ids)
            response = await session.post(
                chorus.server.make_url(f"/v1/conversations/{victim}/cancel")
            )
            assert response.status in (202, 409)  # 409: it had already finished
            await asyncio.sleep(rng.uniform(0.05, 0.2))

    async def subscriber(session: aiohttp.ClientSession, number: int) -> None:
        nonlocal left
        await eventually(lambda: bool(conversation_ids))
        await asyncio.sleep(rng.uniform(0, 1.0))  # arrivals spread over time
        conversation_id = rng.choice(conversation_ids)
        response = await session.get(chorus.server.make_url(
            f"/v1/conversations/{conversation_id}/events"
        ))
        stream = EventStream(response)
        if number % 3 == 0:  # one in three leaves early, at a random point
            for _ in range(rng.randint(1, PIECES // 2)):
                if turn_has_ended(await stream.next_event()):
                    break
            stream.close()
            left += 1
            return
        events = await stream.until_turn_ends()
        stream.close()
        stayed.append((conversation_id, events))

    async with asyncio.timeout(60):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.gather(
                start_conversations(session),
                cancel_some(session),
                *(subscriber(session, n) for n in range(SUBSCRIBERS)),
            )
        await eventually(lambda: not upstream_tasks())

    # Back to baseline: no subscriber, cursor, task or descriptor left behind, except
    # Chorus's keep-alive pool of upstream connections (a feature: reused by later turns;
    # each is one server task on the fake upstream's side and two descriptors here).
    await eventually(lambda: all(
        conversation.log.subscriber_count == 0 for conversation in chorus.registry.all()
    ))
    await eventually(lambda: not chorus.server.runner.server.connections)
    pooled = fake_upstream.open_connections
    assert pooled <= CONVERSATIONS
    await eventually(lambda: len(asyncio.all_tasks()) <= tasks_before + pooled)
    gc.collect()
    assert sum(isinstance(o, MemoryCursor) for o in gc.get_objects()) == 0
    await eventually(lambda: len(os.listdir("/proc/self/fd")) <= fds_before + 2 * pooled + 2)

    # And every subscriber that stayed saw exactly what was produced.
    assert left == SUBSCRIBERS // 3
    assert len(stayed) == SUBSCRIBERS - left
    cancelled = 0
    for conversation_id, events in stayed:
        state = await chorus.state(conversation_id)
        turn = state["turns"][0]
        if turn["status"] == "done":
            assert assembled_answer(events) == expected[prompt_of[conversation_id]]
        else:
            assert turn["status"] == "cancelled"
            cancelled += 1
            produced = turn["choices"][0]["content"] if turn["choices"] else ""
            assert assembled_answer(events) == produced
            assert expected[prompt_of[conversation_id]].startswith(produced)
    assert cancelled > 0  # the run did exercise cancellation
