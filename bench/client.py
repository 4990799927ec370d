"""The C load client (`sse_client.c`): built at run time, run pinned, read line by line.

The client prints one JSON object per line: `{"phase": "ready", ...}` once every
connection has had its first event, then `{"phase": "finished", ...}` with the summary.
With `pause` it then waits for a line on stdin before closing its connections, so the
harness can sample the server while every subscriber is still attached.
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import Managed, Processes

SOURCE = Path(__file__).resolve().parent / "sse_client.c"


def build_client(build_dir: Path) -> Path:
    """Compile sse_client.c with gcc -O2 into build_dir; raise with gcc's output on failure."""
    binary = build_dir / "sse_client"
    result = subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(SOURCE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"gcc failed:\n{result.stderr}")
    if result.stderr.strip():
        print(f"gcc warnings:\n{result.stderr}")
    return binary


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientOptions:
    port: int
    paths: list[str]
    conns: int
    last_event_id: int | None = None
    ready_timeout: float = 60.0
    run_timeout: float = 60.0
    max_pending: int = 100  # below aiohttp's listen backlog of 128: see sse_client.c
    sequential: bool = False
    close_on_done: bool = False
    until_ready: bool = False
    pause: bool = False
    churn_rate: float = 0.0
    churn_seconds: float = 0.0

    def argv(self, paths_file: Path) -> list[str]:
        args = [
            "--port", str(self.port),
            "--paths-file", str(paths_file),
            "--conns", str(self.conns),
            "--ready-timeout", f"{self.ready_timeout:g}",
            "--run-timeout", f"{self.run_timeout:g}",
            "--max-pending", str(self.max_pending),
            "--until", "ready" if self.until_ready else "done",
        ]  # fmt: skip
        if self.last_event_id is not None:
            args += ["--last-event-id", str(self.last_event_id)]
        if self.sequential:
            args.append("--sequential")
        if self.close_on_done:
            args.append("--close-on-done")
        if self.pause:
            args.append("--pause")
        if self.churn_rate > 0:
            args += ["--churn-rate", f"{self.churn_rate:g}"]
            args += ["--churn-seconds", f"{self.churn_seconds:g}"]
        return args


class ClientRun:
    """One run of the client process."""

    def __init__(self, managed: Managed, options: ClientOptions) -> None:
        self.managed = managed
        self.options = options

    @classmethod
    async def start(
        cls,
        processes: Processes,
        binary: Path,
        options: ClientOptions,
        *,
        work_dir: Path,
        cpu: int,
        name: str = "client",
    ) -> ClientRun:
        paths_file = work_dir / f"{name}-paths.txt"
        paths_file.write_text("".join(f"{path}\n" for path in options.paths))
        managed = await processes.spawn(
            name, [str(binary), *options.argv(paths_file)], cpu=cpu, cwd=work_dir, pipes=True
        )
        return cls(managed, options)

    @property
    def pid(self) -> int:
        return self.managed.pid

    async def wait_phase(self, phase: str, *, timeout: float) -> dict[str, Any]:
        """Read stdout lines until the one for `phase`; raise on EOF or timeout."""
        return await self.managed.read_phase(phase, timeout=timeout)

    async def go(self) -> None:
        """Let a paused client close its connections and exit."""
        stdin = self.managed.proc.stdin
        if stdin is not None and not stdin.is_closing():
            try:
                stdin.write(b"go\n")
                await stdin.drain()
                stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass

    async def finish(self, *, timeout: float = 30.0) -> None:
        """Wait for the client to exit (after `go()` if paused); stop it if it does not."""
        await self.go()
        try:
            await asyncio.wait_for(self.managed.proc.wait(), timeout)
        except TimeoutError:
            await self.managed.stop()
        returncode = self.managed.proc.returncode
        if returncode not in (0, None):
            raise RuntimeError(
                f"client exited with {returncode}: {await self.managed.stderr_text()}"
            )


async def run_client(
    processes: Processes,
    binary: Path,
    options: ClientOptions,
    *,
    work_dir: Path,
    cpu: int,
    name: str = "client",
) -> dict[str, Any]:
    """Run the client to completion (no pause) and return its summary."""
    run = await ClientRun.start(processes, binary, options, work_dir=work_dir, cpu=cpu, name=name)
    try:
        summary = await run.wait_phase(
            "finished", timeout=options.ready_timeout + options.run_timeout + 15
        )
        await run.finish()
        return summary
    finally:
        await run.managed.stop()
