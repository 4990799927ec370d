"""Stopping tasks we own: cancel, then wait, without swallowing our own cancellation."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any], reason: str | None = None) -> None:
    """Cancel `task` (with `reason` as the CancelledError message) and wait for it to end.

    The task's own CancelledError is expected and absorbed; if the caller itself is being
    cancelled meanwhile, that cancellation propagates.
    """
    task.cancel(reason)
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
