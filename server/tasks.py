"""Stopping tasks we own: cancel, then wait, without swallowing our own cancellation."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any], reason: str | None = None) -> None:
    """Cancel `task` (with `reason` as the CancelledError message) and wait for it to end.

    The task's own CancelledError is expected and absorbed. If the caller is cancelled
    *while* waiting, that cancellation propagates. Cancellation requests that were already
    pending on the caller before (aiohttp runs its shutdown hooks inside a cancelled task)
    are compared against, not mistaken for a new one.
    """
    current = asyncio.current_task()
    cancelling_before = current.cancelling() if current is not None else 0
    task.cancel(reason)
    try:
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > cancelling_before:
            raise
