"""Processes the benchmark starts: pinned to a CPU with taskset, stopped by their PID.

Owns spawning (in a new session, so a Ctrl-C in the terminal reaches only the harness,
which then stops everything in order), readiness checks (a bounded TCP-connect or
`/healthz` poll), stopping (SIGTERM, then SIGKILL after a grace period) and reading a
process's CPU time and memory from /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_GRACE_SECONDS = 5.0


SHORT_WINDOW_SECONDS = 2.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds, from /proc/<pid>/stat.

    Counted in clock ticks (1/CLK_TCK, usually 10 ms): coarse over short windows.
    """
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def cpu_seconds_fine(pid: int) -> float | None:
    """Time on CPU of a process's live threads, in ns resolution, from schedstat.

    None when the kernel has no schedstat. Threads that exited are not counted (the
    servers here keep theirs), so this is for short windows, with `cpu_seconds` as the
    reference for long ones.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except FileNotFoundError:
                continue  # the thread exited meanwhile
    except FileNotFoundError:
        return None
    return total / 1e9


@dataclass(frozen=True, slots=True)
class Memory:
    rss_kib: int  # VmRSS: resident now
    hwm_kib: int  # VmHWM: peak resident since the process started


def memory(pid: int) -> Memory:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])  # "  1234 kB"
    return Memory(rss_kib=values.get("VmRSS", 0), hwm_kib=values.get("VmHWM", 0))


@dataclass(frozen=True, slots=True)
class CpuUse:
    """CPU used by some processes over a window."""

    window_s: float
    pct: dict[str, float]  # % of one core: stat ticks, or schedstat for short windows
    pct_stat: dict[str, float]  # from /proc/<pid>/stat utime+stime
    pct_schedstat: dict[str, float | None]  # from /proc/<pid>/task/*/schedstat
    source: str  # which of the two `pct` is


class CpuWindow:
    """CPU time used by some processes between `__init__` and `stop()`, as % of one core."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._start_wall = time.monotonic()
        self._start = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self._start_fine = {name: cpu_seconds_fine(pid) for name, pid in pids.items()}

    def stop(self) -> CpuUse:
        wall = time.monotonic() - self._start_wall
        stat = {
            name: 100.0 * (cpu_seconds(pid) - self._start[name]) / wall
            for name, pid in self._pids.items()
        }
        fine: dict[str, float | None] = {}
        for name, pid in self._pids.items():
            start, end = self._start_fine[name], cpu_seconds_fine(pid)
            fine[name] = None if start is None or end is None else 100.0 * (end - start) / wall
        use_fine = wall < SHORT_WINDOW_SECONDS and all(v is not None for v in fine.values())
        if use_fine:
            pct = {name: value for name, value in fine.items() if value is not None}
        else:
            pct = stat
        return CpuUse(
            window_s=wall,
            pct=pct,
            pct_stat=stat,
            pct_schedstat=fine,
            source="schedstat" if use_fine else "stat",
        )


def free_port() -> int:
    """A free loopback TCP port (the OS picks; the tiny reuse race is acceptable here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinning_available() -> bool:
    cpus = os.sched_getaffinity(0)
    return shutil.which("taskset") is not None and {0, 1} <= cpus


@dataclass(eq=False)
class Managed:
    """One process we started."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path | None
    log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    async def read_phase(self, phase: str, *, timeout: float) -> dict[str, Any]:
        """Read JSON lines from stdout until `{"phase": phase, ...}`; raise on EOF or timeout.

        For processes spawned with `pipes=True` that report in JSON lines (the C client, the
        send-floor sender).
        """
        stdout = self.proc.stdout
        if stdout is None:
            raise RuntimeError(f"{self.name} was not spawned with pipes=True")
        async with asyncio.timeout(timeout):
            while True:
                line = await stdout.readline()
                if not line:
                    raise RuntimeError(
                        f"{self.name} exited before {phase!r}: {await self.stderr_text()}"
                    )
                message: dict[str, Any] = json.loads(line)
                if message.get("phase") == phase:
                    return message

    async def stderr_text(self) -> str:
        """The start of what a piped process wrote to stderr (waits at most 1 s)."""
        stderr = self.proc.stderr
        if stderr is None:
            return ""
        try:
            data = await asyncio.wait_for(stderr.read(4096), 1.0)
        except TimeoutError:
            return ""
        return data.decode(errors="replace").strip()

    async def stop(self) -> None:
        """SIGTERM, wait up to STOP_GRACE_SECONDS, then SIGKILL. Idempotent."""
        try:
            if self.running:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.proc.wait(), STOP_GRACE_SECONDS)
                except TimeoutError:
                    self.proc.kill()
                    await asyncio.wait_for(self.proc.wait(), STOP_GRACE_SECONDS)
        except ProcessLookupError:
            pass
        finally:
            if self.log_file is not None:
                self.log_file.close()
                self.log_file = None


class Processes:
    """Every process this benchmark run started; `stop_all()` (and `kill_all()`) end them."""

    def __init__(self, *, log_dir: Path, pin: bool) -> None:
        self._log_dir = log_dir
        self._pin = pin
        self._started: list[Managed] = []

    async def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        cpu: int,
        cwd: Path,
        env: dict[str, str] | None = None,
        pipes: bool = False,
    ) -> Managed:
        """Start `argv` pinned to `cpu`; its output goes to a log file, or to pipes."""
        command = ["taskset", "-c", str(cpu), *argv] if self._pin else argv
        log_path: Path | None = None
        log_file: IO[bytes] | None = None
        if pipes:
            proc = await asyncio.create_subprocess_exec(
                *command,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        else:
            log_path = self._log_dir / f"{name}.log"
            log_file = log_path.open("ab")
            proc = await asyncio.create_subprocess_exec(
                *command,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        managed = Managed(name=name, proc=proc, log_path=log_path, log_file=log_file)
        self._started.append(managed)
        return managed

    async def stop_all(self) -> None:
        running = [managed for managed in self._started if managed.running]
        await asyncio.gather(*(managed.stop() for managed in running), return_exceptions=True)
        self._started = [managed for managed in self._started if managed.running]

    def kill_all(self) -> None:
        """Last resort, from synchronous code: SIGKILL whatever is still running, by PID."""
        for managed in self._started:
            if managed.running:
                try:
                    os.kill(managed.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


async def wait_for_port(managed: Managed, port: int, *, timeout: float = 30.0) -> None:
    """Return once 127.0.0.1:port accepts a connection; raise if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not managed.running:
            raise RuntimeError(f"{managed.name} exited early:\n{managed.log_tail()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError(
        f"{managed.name} did not listen on port {port} within {timeout:g} s:\n"
        f"{managed.log_tail()}"
    )


async def wait_for_healthz(
    managed: Managed, session: aiohttp.ClientSession, base_url: str, *, timeout: float = 30.0
) -> None:
    """Return once GET /healthz answers 200; raise if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not managed.running:
            raise RuntimeError(f"{managed.name} exited early:\n{managed.log_tail()}")
        try:
            async with session.get(
                f"{base_url}/healthz", timeout=aiohttp.ClientTimeout(total=1)
            ) as response:
                if response.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(
        f"{managed.name}: /healthz not ready within {timeout:g} s:\n{managed.log_tail()}"
    )
