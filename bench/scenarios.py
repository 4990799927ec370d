"""The scenarios: what each one asks of a server, how it is run, what it reports.

Every run starts a fresh stack - the mock upstream (CPU 1), the server under test (CPU 0)
- so no scenario inherits another's memory or connections, and stops it in `finally`.
The load client also runs on CPU 1. Each scenario returns a `Row`: the numbers for the
table, and everything measured for the JSON.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from server.mock import mock_answer, split_into_chunks

from .client import ClientOptions, ClientRun, run_client
from .procs import (
    CpuUse,
    CpuWindow,
    Managed,
    Processes,
    free_port,
    memory,
    wait_for_healthz,
    wait_for_port,
)

REPO = Path(__file__).resolve().parent.parent
SERVER_CPU = 0
LOAD_CPU = 1  # the mock and the client
PACE_SLACK_SECONDS = 1.0  # "kept pace": the last event arrived within this of the source's end
MESSAGES: list[dict[str, object]] = [{"role": "user", "content": "Benchmark the fan-out, please."}]
SERVERS = ("chorus", "naive", "aiohttp-floor")
FLOOR_SERVER = "aiohttp-floor"  # bench/floor_server.py: holds subscribers, nothing else


def runs_in(kind: str, key: str) -> bool:
    """Whether server `kind` takes part in scenario `key`: the floor server only in (d)."""
    return kind != FLOOR_SERVER or key == "d"


@dataclass
class Row:
    """One (scenario, server) result: the table's cells and the raw measurements."""

    scenario: str
    server: str
    title: str
    asked: str = "-"  # deliveries per second asked of the server (or what was asked)
    delivered_pct: float | None = None
    kept_pace: bool | None = None
    cpu_pct: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    memory_mib: float | None = None
    result: str = ""
    error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamSpec:
    conversations: int
    subscribers: int
    chunks: int
    rate: float
    churn_rate: float = 0.0

    @property
    def seconds(self) -> float:
        return self.chunks / self.rate


@dataclass(frozen=True, slots=True)
class Plan:
    """The sizes of every scenario (full run, or --quick)."""

    heavy: StreamSpec
    typical: StreamSpec
    many: StreamSpec
    idle_subscribers: int
    replay_events: int
    replay_tries: int
    churn: StreamSpec
    burst_joiners: int
    burst_chunks: int


FULL = Plan(
    heavy=StreamSpec(1, 1000, 1000, 200.0),
    typical=StreamSpec(1, 1000, 250, 50.0),
    many=StreamSpec(200, 5, 100, 20.0),
    idle_subscribers=10_000,
    replay_events=1000,
    replay_tries=21,
    churn=StreamSpec(1, 1000, 250, 50.0, churn_rate=100.0),
    burst_joiners=1000,
    burst_chunks=500,
)
QUICK = Plan(
    heavy=StreamSpec(1, 200, 200, 200.0),
    typical=StreamSpec(1, 200, 100, 50.0),
    many=StreamSpec(40, 5, 40, 20.0),
    idle_subscribers=1000,
    replay_events=1000,
    replay_tries=5,
    churn=StreamSpec(1, 200, 100, 50.0, churn_rate=100.0),
    burst_joiners=200,
    burst_chunks=500,
)


@dataclass
class Bench:
    """What every scenario run needs: processes, the client binary, an HTTP session."""

    processes: Processes
    client_binary: Path
    work_dir: Path
    session: aiohttp.ClientSession
    python: str = sys.executable
    # "auto": each server picks its own loop (uvloop when installed, as `python -m server`
    # does); "asyncio": uvloop is hidden from every server, so all run the stdlib loop.
    loop: str = "auto"

    def python_argv(self, *, module: str | None = None, script: Path | None = None) -> list[str]:
        """How to run a server's entry point, with uvloop hidden when loop == "asyncio"."""
        if self.loop == "auto":
            return [self.python, "-m", module] if module else [self.python, str(script)]
        # A None entry in sys.modules makes `import uvloop` raise ImportError.
        run = (
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
            if module
            else f"runpy.run_path({str(script)!r}, run_name='__main__')"
        )
        return [self.python, "-c", f"import runpy, sys; sys.modules['uvloop'] = None; {run}"]


@dataclass
class Stack:
    """A running mock upstream and server under test."""

    kind: str
    mock: Managed
    mock_url: str
    server: Managed
    server_port: int
    server_url: str


def _pieces_per_answer() -> int:
    return len(split_into_chunks(mock_answer(MESSAGES)))


def _clean_env() -> dict[str, str]:
    """The environment for servers: no inherited CHORUS_* settings and no API key."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CHORUS_") and key != "OPENAI_API_KEY"
    }


@asynccontextmanager
async def stack(
    bench: Bench, kind: str, *, rate: float, chunks: int, hold: bool
) -> AsyncIterator[Stack]:
    """Start the mock (stamped, optionally held) and the server `kind`; stop both after."""
    repeat = math.ceil(chunks / _pieces_per_answer()) + 1
    mock_port, server_port = free_port(), free_port()
    mock_argv = [
        bench.python, "-m", "server.mock", "--port", str(mock_port), "--rate", f"{rate:g}",
        "--repeat", str(repeat), "--stamp", "--log-level", "WARNING",
    ]  # fmt: skip
    if hold:
        mock_argv.append("--hold")
    upstream = f"http://127.0.0.1:{mock_port}/v1"
    started: list[Managed] = []
    try:
        mock = await bench.processes.spawn(
            f"mock-{kind}", mock_argv, cpu=LOAD_CPU, cwd=REPO, env=_clean_env()
        )
        started.append(mock)
        await wait_for_port(mock, mock_port)
        if kind == "chorus":
            env = _clean_env() | {
                "CHORUS_SERVER_LOG_LEVEL": "WARNING",
                "CHORUS_HUB_HEARTBEAT_SECONDS": "15",
                # A held answer (the idle scenario) must not time out upstream.
                "CHORUS_UPSTREAM_FIRST_CHUNK_TIMEOUT": "600",
                "CHORUS_UPSTREAM_IDLE_TIMEOUT": "600",
                # One caller creates up to 200 conversations per run ((c)): lift the
                # per-caller start limit (60 a minute by default; 0 = unlimited).
                "CHORUS_LIMITS_STARTS_PER_MINUTE_PER_KEY": "0",
            }
            argv = [*bench.python_argv(module="server"), "--port", str(server_port),
                    "--upstream-base-url", upstream]  # fmt: skip
        elif kind == FLOOR_SERVER:
            # No upstream: the mock above idles, so every stack has the same shape.
            env = _clean_env()
            argv = [*bench.python_argv(script=REPO / "bench" / "floor_server.py"),
                    "--port", str(server_port)]  # fmt: skip
        else:
            env = _clean_env()
            argv = [*bench.python_argv(script=REPO / "bench" / "naive_server.py"),
                    "--port", str(server_port), "--upstream-base-url", upstream,
                    "--heartbeat-seconds", "15", "--log-level", "WARNING"]  # fmt: skip
        server = await bench.processes.spawn(kind, argv, cpu=SERVER_CPU, cwd=REPO, env=env)
        started.append(server)
        server_url = f"http://127.0.0.1:{server_port}"
        if kind == "chorus":
            await wait_for_healthz(server, bench.session, server_url)
        else:
            await wait_for_port(server, server_port)
        yield Stack(
            kind=kind,
            mock=mock,
            mock_url=f"http://127.0.0.1:{mock_port}",
            server=server,
            server_port=server_port,
            server_url=server_url,
        )
    finally:
        for managed in reversed(started):
            await managed.stop()


async def create_conversations(bench: Bench, st: Stack, count: int, *, chunks: int) -> list[str]:
    """POST `count` conversations (answers of exactly `chunks` pieces); their events paths."""
    limit = asyncio.Semaphore(32)

    async def create() -> str:
        async with limit:
            async with bench.session.post(
                f"{st.server_url}/v1/conversations",
                json={"messages": MESSAGES, "max_tokens": chunks},
            ) as response:
                body = await response.json()
                if response.status != 201:
                    raise RuntimeError(f"create conversation: {response.status} {body}")
                path: str = body["events_url"]
                return path

    return list(await asyncio.gather(*(create() for _ in range(count))))


async def wait_held(bench: Bench, st: Stack, count: int, *, timeout: float = 30.0) -> None:
    """Wait until the mock holds `count` completions (every upstream request has arrived)."""
    deadline = time.monotonic() + timeout
    held = -1
    while time.monotonic() < deadline:
        async with bench.session.get(f"{st.mock_url}/control/held") as response:
            held = int((await response.json())["held"])
        if held >= count:
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"the mock holds {held} completions, expected {count}")


async def release(bench: Bench, st: Stack) -> int:
    async with bench.session.post(f"{st.mock_url}/control/release") as response:
        return int((await response.json())["released"])


async def wait_complete(bench: Bench, st: Stack, path: str, *, answers: int) -> None:
    """Follow one conversation to its `done` and check it has every answer."""
    summary = await run_client(
        bench.processes,
        bench.client_binary,
        ClientOptions(port=st.server_port, paths=[path], conns=1, run_timeout=60),
        work_dir=bench.work_dir,
        cpu=LOAD_CPU,
        name="client-warmup",
    )
    got = summary["answers"]["total"]
    if summary["ok"] != 1 or got != answers:
        raise RuntimeError(f"the source answer is incomplete: {got}/{answers} answers")


LOAD_SATURATED_PCT = 90.0


def _load_side_warning(cpu: CpuUse) -> list[str]:
    """A note when the load CPU (client + mock) was nearly saturated: latency suspect."""
    load = sum(cpu.pct.get(name, 0.0) for name in ("client", "mock"))
    if load < LOAD_SATURATED_PCT:
        return []
    return [f"LOAD CPU {load:.0f}%: latency may include the client's delay"]


def _ms(us: float) -> float | None:
    return None if us < 0 else us / 1000.0


def _check_ids(summary: dict[str, Any]) -> list[str]:
    problems = []
    if summary["id_gap_conns"]:
        problems.append(f"{summary['id_gap_conns']} conns with id gaps")
    if summary["id_dup_conns"]:
        problems.append(f"{summary['id_dup_conns']} conns with duplicate ids")
    if summary["failed"]:
        problems.append(f"{summary['failed']} conns failed {summary['fail_reasons']}")
    if summary["timed_out"]:
        problems.append("timed out")
    return problems


# --- streaming: (a), (b), (c), (f) ----------------------------------------------------------


async def run_stream(bench: Bench, kind: str, key: str, title: str, spec: StreamSpec) -> Row:
    """N conversations x M subscribers, all attached before the upstream starts."""
    conns = spec.conversations * spec.subscribers
    asked = conns * spec.rate
    row = Row(key, kind, title, asked=f"{asked:,.0f}/s")
    run_timeout = spec.seconds * 4 + 10
    async with stack(bench, kind, rate=spec.rate, chunks=spec.chunks, hold=True) as st:
        paths = await create_conversations(bench, st, spec.conversations, chunks=spec.chunks)
        await wait_held(bench, st, spec.conversations)
        options = ClientOptions(
            port=st.server_port,
            paths=paths,
            conns=conns,
            ready_timeout=60,
            run_timeout=run_timeout,
            pause=True,
            churn_rate=spec.churn_rate,
            churn_seconds=spec.seconds,
        )
        client = await ClientRun.start(
            bench.processes, bench.client_binary, options, work_dir=bench.work_dir, cpu=LOAD_CPU
        )
        try:
            ready = await client.wait_phase("ready", timeout=options.ready_timeout + 10)
            window = CpuWindow({"server": st.server.pid, "mock": st.mock.pid, "client": client.pid})
            released_at = time.monotonic()
            released = await release(bench, st)
            summary = await client.wait_phase("finished", timeout=run_timeout + 15)
            cpu = window.stop()
            mem = memory(st.server.pid)
            await client.finish()
        finally:
            await client.managed.stop()

    expected = conns * spec.chunks
    delivered = summary["answers"]["total"]
    source_end = released_at + spec.seconds
    lag = summary["last_event_mono"] - summary["max_stamp"] if summary["max_stamp"] else math.inf
    row.delivered_pct = 100.0 * delivered / expected
    row.kept_pace = delivered == expected and lag <= PACE_SLACK_SECONDS and not summary["timed_out"]
    row.cpu_pct = cpu.pct["server"]
    row.p50_ms = _ms(summary["latency_us"]["p50"])
    row.p99_ms = _ms(summary["latency_us"]["p99"])
    row.memory_mib = mem.hwm_kib / 1024
    notes = [f"lag {lag:.2f} s" if math.isfinite(lag) else "no events"]
    if spec.churn_rate:
        churn = summary["churn"]
        note = f"churn: {churn['ok']}/{churn['opened']} got a first event"
        if churn["ok"]:
            note += f" (median {churn['first_event_s']['p50'] * 1000:.1f} ms)"
        if churn["waiting"]:
            note += f", {churn['waiting']} still waiting at the end"
        if churn["failed"]:
            note += f", {churn['failed']} failed"
        notes.append(note)
    notes += _check_ids(summary)
    notes += _load_side_warning(cpu)
    if ready["failed"]:
        notes.append(f"{ready['failed']} failed to attach")
    row.result = ", ".join(notes)
    row.raw = {
        "spec": asdict(spec),
        "released": released,
        "cpu": asdict(cpu),
        "memory_kib": asdict(mem),
        "expected_answers": expected,
        "last_event_lag_s": lag,
        "source_lag_s": summary["max_stamp"] - source_end if summary["max_stamp"] else None,
        "ready": ready,
        "client": summary,
    }
    return row


# --- (d) idle subscribers --------------------------------------------------------------------


async def run_idle(bench: Bench, kind: str, key: str, title: str, subscribers: int) -> Row:
    """N subscribers on a held conversation: memory per subscriber, all of them held."""
    row = Row(key, kind, title, asked=f"{subscribers:,} held")
    async with stack(bench, kind, rate=1.0, chunks=10, hold=True) as st:
        paths = await create_conversations(bench, st, 1, chunks=10)
        if kind != FLOOR_SERVER:  # the floor server makes no upstream request
            await wait_held(bench, st, 1)
        before = memory(st.server.pid)
        window = CpuWindow({"server": st.server.pid})
        options = ClientOptions(
            port=st.server_port,
            paths=paths,
            conns=subscribers,
            ready_timeout=120,
            until_ready=True,
            pause=True,
        )
        client = await ClientRun.start(
            bench.processes, bench.client_binary, options, work_dir=bench.work_dir, cpu=LOAD_CPU
        )
        try:
            summary = await client.wait_phase("finished", timeout=options.ready_timeout + 15)
            cpu = window.stop()
            after = memory(st.server.pid)
            await client.finish()
        finally:
            await client.managed.stop()
    held = summary["ready"]
    per_sub_kib = (after.rss_kib - before.rss_kib) / held if held else math.nan
    row.delivered_pct = 100.0 * held / subscribers
    row.cpu_pct = cpu.pct["server"]
    row.memory_mib = after.rss_kib / 1024
    notes = [
        f"{held:,}/{subscribers:,} held",
        f"{per_sub_kib:.1f} KiB/sub",
        f"attach {summary['t_ready_s']:.1f} s",
    ] + _check_ids(summary)
    row.result = ", ".join(notes)
    row.raw = {
        "subscribers": subscribers,
        "held": held,
        "rss_before_kib": before.rss_kib,
        "rss_after_kib": after.rss_kib,
        "kib_per_subscriber": per_sub_kib,
        "cpu": asdict(cpu),
        "client": summary,
    }
    return row


# --- (e) late joiner replay ------------------------------------------------------------------


async def run_replay(bench: Bench, kind: str, key: str, title: str, events: int, tries: int) -> Row:
    """One late joiner replaying a finished answer of `events` answer events, `tries` times."""
    row = Row(key, kind, title, asked=f"{tries} x {events + 2} events")
    async with stack(bench, kind, rate=0.0, chunks=events, hold=False) as st:
        (path,) = await create_conversations(bench, st, 1, chunks=events)
        await wait_complete(bench, st, path, answers=events)
        window = CpuWindow({"server": st.server.pid})
        summary = await run_client(
            bench.processes,
            bench.client_binary,
            ClientOptions(
                port=st.server_port,
                paths=[path],
                conns=tries,
                run_timeout=60,
                sequential=True,
                close_on_done=True,
            ),
            work_dir=bench.work_dir,
            cpu=LOAD_CPU,
        )
        cpu = window.stop()
        mem = memory(st.server.pid)
    done = summary["done_s"]
    row.delivered_pct = 100.0 * summary["answers"]["total"] / (tries * events)
    row.cpu_pct = cpu.pct["server"]
    row.memory_mib = mem.hwm_kib / 1024
    server_ms = cpu.pct["server"] * cpu.window_s * 10  # % x s -> ms
    notes = [
        f"to last event: median {done['p50'] * 1000:.2f} ms "
        f"(min {done['min'] * 1000:.2f}, max {done['max'] * 1000:.2f})",
        f"server CPU {server_ms / tries:.2f} ms/replay",
    ] + _check_ids(summary)
    row.result = ", ".join(notes)
    row.raw = {
        "events": events + 2,
        "tries": tries,
        "cpu": asdict(cpu),
        "memory_kib": asdict(mem),
        "median_to_last_event_s": done["p50"],
        "client": summary,
    }
    return row


# --- (g) burst of late joiners ---------------------------------------------------------------


async def run_burst(
    bench: Bench, kind: str, key: str, title: str, joiners: int, chunks: int
) -> Row:
    """`joiners` late joiners at once on a finished answer: time until all have everything."""
    row = Row(key, kind, title, asked=f"{joiners:,} x {chunks + 2} events")
    async with stack(bench, kind, rate=0.0, chunks=chunks, hold=False) as st:
        (path,) = await create_conversations(bench, st, 1, chunks=chunks)
        await wait_complete(bench, st, path, answers=chunks)
        window = CpuWindow({"server": st.server.pid})
        options = ClientOptions(
            port=st.server_port,
            paths=[path],
            conns=joiners,
            run_timeout=60,
            pause=True,
        )
        client = await ClientRun.start(
            bench.processes, bench.client_binary, options, work_dir=bench.work_dir, cpu=LOAD_CPU
        )
        try:
            summary = await client.wait_phase("finished", timeout=options.run_timeout + 70)
            cpu = window.stop()
            mem = memory(st.server.pid)
            await client.finish()
        finally:
            await client.managed.stop()
    all_done = summary["t_last_event_s"]
    row.delivered_pct = 100.0 * summary["answers"]["total"] / (joiners * chunks)
    row.cpu_pct = cpu.pct["server"]
    row.memory_mib = mem.hwm_kib / 1024
    notes = [
        f"all complete in {all_done:.3f} s",
        f"median joiner {summary['done_s']['p50'] * 1000:.1f} ms",
        f"server CPU {cpu.pct['server'] * cpu.window_s * 10:.0f} ms",
    ] + _check_ids(summary)
    row.result = ", ".join(notes)
    row.raw = {
        "joiners": joiners,
        "events": chunks + 2,
        "cpu": asdict(cpu),
        "memory_kib": asdict(mem),
        "all_complete_s": all_done,
        "client": summary,
    }
    return row


# --- the machine floor: CPU per loopback send() ----------------------------------------------


@dataclass(frozen=True, slots=True)
class FloorSpec:
    """The send-floor measurement: (b)'s fan-out shape, one small chunk per socket per round."""

    conns: int = 1000
    rounds: int = 100
    pause_ms: float = 10.0
    size: int = 150  # bytes per send: about one `answer` frame as an HTTP chunk
    # The cost is the median try's: on a shared VM one try can be 20 % off another.
    tries: int = 3


SEND_FLOOR = FloorSpec()


@dataclass(frozen=True, slots=True)
class ScenarioFloor:
    """A scenario's sends per second (one per delivery) and the CPU % they take at the floor."""

    sends_per_s: float
    cpu_pct: float  # of one core


@dataclass
class SendFloor:
    """What one small send() costs here, and the CPU % that makes for (a) and (b)."""

    spec: FloorSpec
    us_per_send: float | None = None  # user + sys, of the median try
    user_us_per_send: float | None = None
    sys_us_per_send: float | None = None
    tries_us_per_send: list[float] = field(default_factory=list)  # every try, in order
    scenarios: dict[str, ScenarioFloor] = field(default_factory=dict)  # "a", "b"
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)


async def run_send_floor(bench: Bench, plan: Plan, spec: FloorSpec = SEND_FLOOR) -> SendFloor:
    """Run bench/send_floor.py on the server's CPU against the C client on the load CPU,
    `spec.tries` times; the cost per send is the median try's."""
    floor = SendFloor(spec)
    tries: list[dict[str, Any]] = []
    expected = spec.conns * (spec.rounds + 1)  # the warm-up round is delivered too
    for number in range(1, spec.tries + 1):
        sender, client = await _send_floor_try(bench, spec)
        sends = sender["sends"]
        tries.append(
            {
                "user_us_per_send": sender["user_s"] * 1e6 / sends,
                "sys_us_per_send": sender["sys_s"] * 1e6 / sends,
                "sender": sender,
                "client": client,
            }
        )
        problems = _check_ids(client)
        if client["answers"]["total"] != expected:
            problems.append(f"the client got {client['answers']['total']}/{expected} sends")
        if sender["short_sends"]:
            problems.append(f"{sender['short_sends']} sends found a full buffer")
        floor.problems += [f"try {number}: {problem}" for problem in problems]
    floor.tries_us_per_send = [t["user_us_per_send"] + t["sys_us_per_send"] for t in tries]
    median = sorted(tries, key=lambda t: t["user_us_per_send"] + t["sys_us_per_send"])[
        len(tries) // 2
    ]
    floor.user_us_per_send = median["user_us_per_send"]
    floor.sys_us_per_send = median["sys_us_per_send"]
    floor.us_per_send = median["user_us_per_send"] + median["sys_us_per_send"]
    for key, stream in (("a", plan.heavy), ("b", plan.typical)):
        per_second = stream.conversations * stream.subscribers * stream.rate
        floor.scenarios[key] = ScenarioFloor(per_second, per_second * floor.us_per_send / 1e4)
    floor.raw = {"tries": tries}
    return floor


async def _send_floor_try(bench: Bench, spec: FloorSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """One fresh sender and client: the sender's result and the client's summary."""
    argv = [
        bench.python, "-m", "bench.send_floor", "--conns", str(spec.conns),
        "--rounds", str(spec.rounds), "--pause-ms", f"{spec.pause_ms:g}", "--size", str(spec.size),
    ]  # fmt: skip
    sender = await bench.processes.spawn(
        "send-floor", argv, cpu=SERVER_CPU, cwd=REPO, env=_clean_env(), pipes=True
    )
    client: ClientRun | None = None
    try:
        listening = await sender.read_phase("listening", timeout=30)
        options = ClientOptions(
            port=int(listening["port"]), paths=["/floor"], conns=spec.conns, run_timeout=60
        )
        client = await ClientRun.start(
            bench.processes, bench.client_binary, options, work_dir=bench.work_dir,
            cpu=LOAD_CPU, name="client-floor",
        )  # fmt: skip
        result = await sender.read_phase(
            "finished", timeout=options.ready_timeout + options.run_timeout
        )
        summary = await client.wait_phase("finished", timeout=options.run_timeout + 15)
        await client.finish()
    finally:
        if client is not None:
            await client.managed.stop()
        await sender.stop()
    return result, summary


# --- the list ---------------------------------------------------------------------------------

SCENARIOS: dict[str, str] = {
    "a": "heavy: 1 conv x {s:,} subs x {c:,} chunks @ {r:g}/s",
    "b": "typical: 1 conv x {s:,} subs x {c:,} chunks @ {r:g}/s",
    "c": "{n:,} convs x {s:,} subs x {c:,} chunks @ {r:g}/s",
    "d": "idle: {n} subs on a held conversation",
    "e": "late joiner replays {n:,} events",
    "f": "churn {k:g}/s during typical ({s:,} subs)",
    "g": "burst: {n} late joiners on a done {c}-chunk answer",
}


def title_of(key: str, plan: Plan) -> str:
    template = SCENARIOS[key]
    if key in "abcf":
        spec = {"a": plan.heavy, "b": plan.typical, "c": plan.many, "f": plan.churn}[key]
        return template.format(
            n=spec.conversations, s=spec.subscribers, c=spec.chunks, r=spec.rate, k=spec.churn_rate
        )
    if key == "d":
        return template.format(n=f"{plan.idle_subscribers:,}")
    if key == "e":
        return template.format(n=plan.replay_events + 2)
    return template.format(n=f"{plan.burst_joiners:,}", c=plan.burst_chunks)


async def run_scenario(bench: Bench, key: str, kind: str, plan: Plan) -> Row:
    title = title_of(key, plan)
    if key == "a":
        return await run_stream(bench, kind, key, title, plan.heavy)
    if key == "b":
        return await run_stream(bench, kind, key, title, plan.typical)
    if key == "c":
        return await run_stream(bench, kind, key, title, plan.many)
    if key == "d":
        return await run_idle(bench, kind, key, title, plan.idle_subscribers)
    if key == "e":
        return await run_replay(bench, kind, key, title, plan.replay_events, plan.replay_tries)
    if key == "f":
        return await run_stream(bench, kind, key, title, plan.churn)
    if key == "g":
        return await run_burst(bench, kind, key, title, plan.burst_joiners, plan.burst_chunks)
    raise ValueError(f"unknown scenario {key!r}")
