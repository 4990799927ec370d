"""The load-test run: owns the client session and every task, and enforces the time bound.

Flows, and who wins the race (`_race` waits for the first of: the work, `stop`, the
deadline):
- normal: every subscriber sees turn 0 end; the all-finished event fires first.
- `--duration` expires: every subscriber task still running is cancelled and awaited,
  and its record is marked `timeout` (it keeps what it measured until then).
- Ctrl-C (the CLI sets `stop`): the same, marked `interrupted`.
- the caller is cancelled: the `finally` blocks cancel and await every task, then the
  cancellation propagates.
The conversations' states are fetched once the subscribers are done, within their own
small bound (`STATE_TIMEOUT_SECONDS`), so a report can compare answers to the server's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from .subscriber import (
    INTERNAL_ERROR,
    INTERRUPTED,
    TIMEOUT,
    LiveCounters,
    SubscriberRecord,
    run_subscriber,
)

__all__ = [
    "DEFAULT_PROMPT",
    "ConversationState",
    "LoadTestConfig",
    "LoadTestError",
    "LoadTestResult",
    "StopReason",
    "run_load_test",
]

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "In three sentences: why can one upstream request serve many viewers?"
REQUEST_TIMEOUT_SECONDS = 10.0
STATE_TIMEOUT_SECONDS = 5.0
PROGRESS_INTERVAL_SECONDS = 0.2
_MAX_JSON_BYTES = 64 * 1024 * 1024

ProgressCallback = Callable[[LiveCounters, float], None]


class StopReason:
    """Why the measurement ended."""

    FINISHED = "finished"
    DURATION = "duration"
    INTERRUPTED = "interrupted"


class LoadTestError(Exception):
    """The run could not start (server unreachable, conversation refused or unknown)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadTestConfig:
    """What to run. `attach` non-empty means attach to those ids instead of starting
    `conversations` new ones; `subscribers` is per conversation."""

    base_url: str
    conversations: int = 1
    prompt: str = DEFAULT_PROMPT
    model: str | None = None
    attach: tuple[str, ...] = ()
    subscribers: int = 100
    ramp_seconds: float = 0.0
    duration_seconds: float = 60.0
    connect_timeout: float = 10.0
    # Chorus sends a `: ping` every 15 s by default, so a healthy stream is never this quiet.
    read_timeout: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationState:
    """Turn 0 of a conversation as `GET /v1/conversations/{id}` reported it after the run."""

    id: str
    status: str | None
    content: str | None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadTestResult:
    config: LoadTestConfig
    conversation_ids: tuple[str, ...]
    records: tuple[SubscriberRecord, ...]
    states: tuple[ConversationState, ...]
    stop_reason: str
    started_at: float
    ended_at: float


async def run_load_test(
    config: LoadTestConfig,
    *,
    stop: asyncio.Event | None = None,
    on_progress: ProgressCallback | None = None,
) -> LoadTestResult:
    """Run one load test; `stop.set()` ends it early, keeping what was measured.

    `on_progress(counters, elapsed_seconds)` is called about five times a second.
    Raises LoadTestError when the conversations cannot be started or found.
    """
    stop = stop if stop is not None else asyncio.Event()
    deadline = asyncio.get_running_loop().time() + config.duration_seconds
    started_at = time.monotonic()
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=config.connect_timeout, sock_read=config.read_timeout
    )
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as session:
        stop_waiter = asyncio.create_task(stop.wait(), name="loadtest:stop")
        try:
            setup = asyncio.create_task(_prepare(session, config), name="loadtest:setup")
            reason = await _race(setup, stop_waiter, deadline)
            if reason == StopReason.INTERRUPTED:
                raise LoadTestError("interrupted before any subscriber connected")
            if reason == StopReason.DURATION:
                raise LoadTestError(
                    f"the conversations were not ready within --duration "
                    f"{config.duration_seconds:g} s"
                )
            conversation_ids = setup.result()
            records, reason = await _measure(
                session, config, conversation_ids, stop_waiter, deadline, on_progress,
                started_at=started_at,
            )
            ended_at = time.monotonic()
            states = await _fetch_states(session, config.base_url, conversation_ids)
        finally:
            await _cancel_and_wait([stop_waiter])
    return LoadTestResult(
        config=config,
        conversation_ids=conversation_ids,
        records=tuple(records),
        states=states,
        stop_reason=reason,
        started_at=started_at,
        ended_at=ended_at,
    )


async def _measure(
    session: aiohttp.ClientSession,
    config: LoadTestConfig,
    conversation_ids: Sequence[str],
    stop_waiter: asyncio.Task[Any],
    deadline: float,
    on_progress: ProgressCallback | None,
    *,
    started_at: float,
) -> tuple[list[SubscriberRecord], str]:
    """Run every subscriber until all finish, `stop` or the deadline; cancel the rest."""
    total = len(conversation_ids) * config.subscribers
    counters = LiveCounters(total=total)
    # Interleaved, so a ramp spreads every conversation's subscribers over the same time.
    records = [
        SubscriberRecord(
            conversation_id=conversation_ids[n % len(conversation_ids)],
            index=n // len(conversation_ids),
        )
        for n in range(total)
    ]
    all_finished = asyncio.Event()

    def count_finished(_: asyncio.Task[None]) -> None:
        counters.finished += 1
        if counters.finished >= total:
            all_finished.set()

    tasks: list[asyncio.Task[None]] = []
    helpers: list[asyncio.Task[Any]] = []
    try:
        for n, record in enumerate(records):
            url = _events_url(config.base_url, record.conversation_id)
            delay = config.ramp_seconds * n / total
            task = asyncio.create_task(
                run_subscriber(session, url, record, counters, delay=delay),
                name=f"loadtest:subscriber:{record.conversation_id[:8]}:{record.index}",
            )
            task.add_done_callback(count_finished)
            tasks.append(task)
        if on_progress is not None:
            helpers.append(asyncio.create_task(
                _report_progress(counters, on_progress, started_at), name="loadtest:progress"
            ))
        if not tasks:
            all_finished.set()
        waiter = asyncio.create_task(all_finished.wait(), name="loadtest:all-finished")
        helpers.append(waiter)
        reason = await _race(waiter, stop_waiter, deadline)
    finally:
        outcomes = await _cancel_and_wait(tasks)
        await _cancel_and_wait(helpers)
    unfinished = TIMEOUT if reason == StopReason.DURATION else INTERRUPTED
    for record, outcome in zip(records, outcomes):
        if isinstance(outcome, asyncio.CancelledError):
            record.finish(unfinished)
        elif isinstance(outcome, BaseException):
            logger.error(
                "subscriber %d of %s failed", record.index, record.conversation_id,
                exc_info=outcome,
            )
            record.finish(INTERNAL_ERROR, type(outcome).__name__)
        else:
            record.finish(INTERNAL_ERROR, "no_outcome")
    return records, reason


async def _race(work: asyncio.Task[Any], stop_waiter: asyncio.Task[Any], deadline: float) -> str:
    """Wait for `work`, `stop` or the deadline, whichever comes first; `work` is always
    done (finished, or cancelled and awaited) when this returns or raises."""
    remaining = max(0.0, deadline - asyncio.get_running_loop().time())
    try:
        await asyncio.wait({work, stop_waiter}, timeout=remaining,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            await _cancel_and_wait([work])
    if not work.cancelled():
        return StopReason.FINISHED
    return StopReason.INTERRUPTED if stop_waiter.done() else StopReason.DURATION


async def _cancel_and_wait(tasks: Sequence[asyncio.Task[Any]]) -> list[object]:
    """Cancel the tasks and wait for all of them; return each one's result or exception.

    If the caller is cancelled meanwhile, gather still waits for the tasks, then the
    caller's cancellation propagates.
    """
    for task in tasks:
        task.cancel()
    if not tasks:
        return []
    return list(await asyncio.gather(*tasks, return_exceptions=True))


async def _report_progress(
    counters: LiveCounters, on_progress: ProgressCallback, started_at: float
) -> None:
    while True:
        on_progress(counters, time.monotonic() - started_at)
        await asyncio.sleep(PROGRESS_INTERVAL_SECONDS)


def _events_url(base_url: str, conversation_id: str) -> str:
    return f"{base_url}/v1/conversations/{conversation_id}/events"


async def _request_json(
    session: aiohttp.ClientSession, method: str, url: str, *, body: object = None
) -> tuple[int, dict[str, Any] | None]:
    """One bounded request: the status and the JSON object answered (None if not one)."""
    data = None if body is None else orjson.dumps(body)
    headers = {"Content-Type": "application/json"} if data is not None else None
    async with session.request(
        method, url, data=data, headers=headers,
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS),
    ) as response:
        raw = await _read_bounded(response.content, _MAX_JSON_BYTES)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return response.status, None
    return response.status, value if isinstance(value, dict) else None


async def _read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes:
    parts = bytearray()
    while True:
        chunk = await content.read(limit + 1 - len(parts))
        if not chunk:
            return bytes(parts)
        parts += chunk
        if len(parts) > limit:
            raise LoadTestError(f"a response body is larger than {limit} bytes")


def _error_text(status: int, body: dict[str, Any] | None) -> str:
    error = body.get("error") if body is not None else None
    if isinstance(error, dict):
        return f"{status} {error.get('code')}: {error.get('message')}"
    return str(status)


async def _prepare(session: aiohttp.ClientSession, config: LoadTestConfig) -> tuple[str, ...]:
    """Start the conversations (or check the attached ones exist); return their ids."""
    try:
        if config.attach:
            for conversation_id in config.attach:
                url = f"{config.base_url}/v1/conversations/{conversation_id}"
                status, body = await _request_json(session, "GET", url)
                if status != 200:
                    raise LoadTestError(
                        f"cannot attach to conversation {conversation_id}: "
                        f"GET answered {_error_text(status, body)}"
                    )
            return config.attach
        request: dict[str, Any] = {"messages": [{"role": "user", "content": config.prompt}]}
        if config.model is not None:
            request["model"] = config.model
        ids: list[str] = []
        for _ in range(config.conversations):
            url = f"{config.base_url}/v1/conversations"
            status, body = await _request_json(session, "POST", url, body=request)
            new_id = body.get("id") if body is not None else None
            if status != 201 or not isinstance(new_id, str):
                raise LoadTestError(
                    f"cannot start a conversation: POST /v1/conversations answered "
                    f"{_error_text(status, body)}"
                )
            ids.append(new_id)
        return tuple(ids)
    except (aiohttp.ClientError, OSError) as error:
        raise LoadTestError(
            f"cannot reach {config.base_url}: {error or type(error).__name__}"
        ) from None


async def _fetch_states(
    session: aiohttp.ClientSession, base_url: str, conversation_ids: Sequence[str]
) -> tuple[ConversationState, ...]:
    states: list[ConversationState] = []
    try:
        async with asyncio.timeout(STATE_TIMEOUT_SECONDS):
            for conversation_id in conversation_ids:
                states.append(await _fetch_state(session, base_url, conversation_id))
    except TimeoutError:
        pass
    fetched = {state.id for state in states}
    states.extend(
        ConversationState(id=conversation_id, status=None, content=None, error="timeout")
        for conversation_id in conversation_ids
        if conversation_id not in fetched
    )
    return tuple(states)


async def _fetch_state(
    session: aiohttp.ClientSession, base_url: str, conversation_id: str
) -> ConversationState:
    try:
        status, body = await _request_json(
            session, "GET", f"{base_url}/v1/conversations/{conversation_id}"
        )
    except (aiohttp.ClientError, OSError, LoadTestError) as error:
        return ConversationState(
            id=conversation_id, status=None, content=None, error=type(error).__name__
        )
    turns = body.get("turns") if body is not None else None
    turn = turns[0] if isinstance(turns, list) and turns else None
    if status != 200 or not isinstance(turn, dict):
        return ConversationState(
            id=conversation_id, status=None, content=None, error=f"http_{status}"
        )
    choices = turn.get("choices")
    content = None
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict) and choice.get("choice") == 0:
                text = choice.get("content")
                content = text if isinstance(text, str) else None
    turn_status = turn.get("status")
    return ConversationState(
        id=conversation_id,
        status=turn_status if isinstance(turn_status, str) else None,
        content=content,
    )
