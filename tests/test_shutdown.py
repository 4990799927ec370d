"""Graceful shutdown of a real `python -m server` process on SIGTERM during a live answer."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp

from .conftest import EventStream, wait_until_serving

REPO_ROOT = Path(__file__).resolve().parent.parent
BOUND_SECONDS = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_server(port: int, **env: str) -> asyncio.subprocess.Process:
    environ = {
        key: value for key, value in os.environ.items()
        if not key.startswith("CHORUS_") and key != "OPENAI_API_KEY"
    }
    environ.update(env)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "--mock", "--port", str(port),
        cwd=REPO_ROOT, env=environ,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    await wait_until_serving(
        f"http://127.0.0.1:{port}/healthz",
        alive=lambda: process.returncode is None,
        timeout=BOUND_SECONDS,
    )
    return process


async def run_shutdown(*, chunks_per_second: str, grace: str) -> tuple[list[list[str]], str, float]:
    """Start a server, attach 3 subscribers to a live answer, SIGTERM it; return what each
    subscriber saw, the server's stderr and how long the process took to exit."""
    port = free_port()
    process = await start_server(
        port,
        CHORUS_MOCK_CHUNKS_PER_SECOND=chunks_per_second,
        CHORUS_SERVER_SHUTDOWN_GRACE_SECONDS=grace,
        CHORUS_HUB_RETRY_HINT_MS="1500",
    )
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{base}/v1/conversations",
                json={"messages": [{"role": "user", "content": "shutdown test"}]},
            ) as response:
                created = await response.json()
            streams = [
                EventStream(await session.get(base + created["events_url"])) for _ in range(3)
            ]
            for stream in streams:
                await stream.until(lambda e: e.event == "answer")
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            seen = [[e.event for e in await stream.until_closed()] for stream in streams]
            raws = [bytes(stream.raw) for stream in streams]
        async with asyncio.timeout(BOUND_SECONDS):
            _, stderr = await process.communicate()
        elapsed = time.monotonic() - started
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    for raw in raws:
        # The end comes with a reconnection hint, for clients to come back to a new server.
        assert raw.rstrip().endswith(b'retry: 1500\nevent: end\ndata: {"reason":"shutdown"}')
    return seen, stderr.decode(), elapsed


def assert_clean_exit(stderr: str) -> None:
    for bad in ("Traceback", "Task was destroyed", "Unclosed", "never awaited", "Error"):
        assert bad not in stderr, stderr


async def test_sigterm_ends_streams_then_cancels_a_turn_that_outlives_the_grace() -> None:
    # 2 chunks/s: the answer cannot finish within a 0.5 s grace.
    seen, stderr, elapsed = await run_shutdown(chunks_per_second="2", grace="0.5")
    for events in seen:
        assert events[0] == "turn" and events[-1] == "end"
        assert "done" not in events
    assert "shutdown: waiting up to 0.5 s for 1 streaming turns" in stderr
    assert "shutdown: cancelled the turn of conversation" in stderr, stderr
    assert_clean_exit(stderr)
    assert elapsed < BOUND_SECONDS
    print(f"\nexited 0 {elapsed:.2f} s after SIGTERM")


async def test_sigterm_lets_a_turn_finish_within_the_grace() -> None:
    # 200 chunks/s: the rest of the answer streams well within a 10 s grace.
    seen, stderr, elapsed = await run_shutdown(chunks_per_second="200", grace="10")
    for events in seen:
        assert events[-1] == "end"
    assert "turn 0 done" in stderr
    assert "cancelled the turn" not in stderr
    assert_clean_exit(stderr)
    assert elapsed < 10.0
    print(f"\nexited 0 {elapsed:.2f} s after SIGTERM")
