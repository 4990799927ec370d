"""`python -m bench`: run the scenarios against Chorus and the naive baseline, print a table.

    python -m bench [--quick] [--only a,b] [--servers chorus,naive,aiohttp-floor]

Builds the C client, pins this harness to the load CPU, measures the machine floor (CPU
per loopback send(), bench/send_floor.py), runs every selected scenario against each
server (a fresh mock + server per run; the aiohttp floor server in (d) only), prints the
floor and one table and writes everything measured to bench/results/<timestamp>.json.
Every process started is stopped by its PID at the end of its run, and on errors and
Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from .client import build_client
from .procs import Processes, pinning_available
from .scenarios import (
    FULL, LOAD_CPU, QUICK, REPO, SCENARIOS, SEND_FLOOR, SERVERS, Bench, Plan, Row, SendFloor,
    run_scenario, run_send_floor, runs_in, title_of,
)  # fmt: skip

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Chorus fan-out benchmark against a naive aiohttp hub, in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument(
        "--only",
        default="",
        help=f"scenarios to run, e.g. a,b (default: all of {','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help="servers to run (default: %(default)s; aiohttp-floor runs in (d) only)",
    )
    parser.add_argument(
        "--loop",
        choices=["auto", "asyncio"],
        default="auto",
        help="auto: each server picks (uvloop when installed); asyncio: hide uvloop from all",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default: bench/results/<ts>.json)"
    )
    args = parser.parse_args(argv)
    keys = [key.strip() for key in args.only.split(",") if key.strip()] or list(SCENARIOS)
    unknown = [key for key in keys if key not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {','.join(unknown)}; choose from {','.join(SCENARIOS)}")
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    if not servers or any(name not in SERVERS for name in servers):
        parser.error(f"--servers takes a subset of {','.join(SERVERS)}")
    args.keys = keys
    args.server_list = servers
    return args


def raise_fd_limit() -> None:
    """Children inherit our soft limit: raise it to the hard limit (10,000 subscribers)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the table ------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    if value >= 10:
        return f"{value:.0f} ms"
    return f"{value:.2f} ms"


def render_table(rows: list[Row]) -> str:
    headers = [
        "scenario", "server", "deliveries asked", "delivered", "kept pace", "CPU %",
        "p50", "p99", "memory", "result",
    ]  # fmt: skip
    lines: list[list[str]] = []
    for row in rows:
        if row.error is not None:
            lines.append([f"({row.scenario}) {row.title}", row.server, row.asked,
                          "-", "-", "-", "-", "-", "-", f"ERROR: {row.error}"])  # fmt: skip
            continue
        pace = "-" if row.kept_pace is None else ("yes" if row.kept_pace else "NO")
        lines.append(
            [
                f"({row.scenario}) {row.title}",
                row.server,
                row.asked,
                _fmt(row.delivered_pct, ".1f", "%"),
                pace,
                _fmt(row.cpu_pct, ".0f"),
                _fmt_ms(row.p50_ms),
                _fmt_ms(row.p99_ms),
                _fmt(row.memory_mib, ".0f", " MiB"),
                row.result,
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]

    def join(cells: list[str]) -> str:
        return " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    out = [join(headers), "-|-".join("-" * width for width in widths)]
    previous = None
    for row, line in zip(rows, lines):
        if previous is not None and row.scenario != previous:
            out.append("")
        previous = row.scenario
        out.append(join(line))
    return "\n".join(out)


def render_floor(floor: SendFloor) -> str:
    """The "machine floor" block: CPU per loopback send() and the floor it sets for (a), (b)."""
    spec = floor.spec
    lines = [
        f"machine floor: one {spec.size}-byte send() to each of {spec.conns:,} loopback TCP "
        f"sockets, {spec.rounds} rounds {spec.pause_ms:g} ms apart (sender on the server's "
        "CPU, the C client reading)"
    ]
    if floor.error is not None or floor.us_per_send is None:
        lines.append(f"  ERROR: {floor.error}")
        return "\n".join(lines)
    tries = floor.tries_us_per_send
    lines.append(
        f"  CPU per send: {floor.us_per_send:.2f} µs "
        f"(user {floor.user_us_per_send:.2f} + sys {floor.sys_us_per_send:.2f}); "
        f"median of {len(tries)} tries, range {min(tries):.2f} to {max(tries):.2f} µs"
    )
    for key, scenario in floor.scenarios.items():
        lines.append(
            f"  floor CPU % for ({key}): {scenario.sends_per_s:,.0f} sends/s"
            f" x {floor.us_per_send:.2f} µs = {scenario.cpu_pct:.0f}% of one core"
        )
    if floor.problems:
        lines.append(f"  problems: {', '.join(floor.problems)}")
    return "\n".join(lines)


# --- metadata -------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _event_loop(choice: str) -> str:
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _sources_sha256() -> str:
    """A hash of server/*.py and bench/*: which code was measured, even in a dirty tree."""
    digest = hashlib.sha256()
    for path in sorted([*(REPO / "server").glob("*.py"), *(REPO / "bench").glob("*.[pc]*")]):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def metadata(args: argparse.Namespace, *, pinned: bool) -> dict[str, Any]:
    return {
        "started_at": datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "scenarios": args.keys,
        "servers": args.server_list,
        "plan": asdict(QUICK if args.quick else FULL),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "sources_sha256": _sources_sha256(),
        "python": sys.version.split()[0],
        "aiohttp": aiohttp.__version__,
        "event_loop": _event_loop(args.loop),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "pinned": pinned,
        "pinning": {"server": 0, "mock": LOAD_CPU, "client": LOAD_CPU, "harness": LOAD_CPU}
        if pinned
        else None,
    }


# --- the run --------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    pinned = pinning_available()
    if pinned:
        os.sched_setaffinity(0, {LOAD_CPU})  # leave CPU 0 to the server under test
    else:
        print("warning: taskset or CPUs 0 and 1 not available: nothing is pinned", flush=True)
    raise_fd_limit()
    plan = QUICK if args.quick else FULL
    meta = metadata(args, pinned=pinned)
    print(
        f"Chorus bench ({'quick' if args.quick else 'full'}): scenarios {','.join(args.keys)}; "
        f"python {meta['python']}, aiohttp {meta['aiohttp']}, {meta['event_loop']}; "
        f"{meta['cpus']} CPUs ({meta['cpu']}); pinned: {pinned}",
        flush=True,
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="chorus-bench-") as tmp:
        work_dir = Path(tmp)
        binary = build_client(work_dir)
        processes = Processes(log_dir=work_dir, pin=pinned)
        # One signal handler for SIGTERM: cancel the run so every `finally` stops its processes.
        main_task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if main_task is not None:
            loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
        try:
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30),
                connector=aiohttp.TCPConnector(limit=64),
            ) as session:
                bench = Bench(
                    processes=processes,
                    client_binary=binary,
                    work_dir=work_dir,
                    session=session,
                    loop=args.loop,
                )
                floor = await measure_floor(bench, plan)
                for key in args.keys:
                    for kind in args.server_list:
                        if runs_in(kind, key):
                            rows.append(await run_one(bench, key, kind, plan))
        finally:
            await processes.stop_all()
            processes.kill_all()
            loop.remove_signal_handler(signal.SIGTERM)

    floor_block = render_floor(floor)
    table = render_table(rows)
    print()
    print(floor_block)
    print()
    print(table)
    out = args.out or RESULTS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "meta": meta,
        "machine_floor": asdict(floor),
        "table": f"{floor_block}\n\n{table}",
        "rows": [asdict(row) for row in rows],
    }
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 1 if floor.error or any(row.error for row in rows) else 0


async def measure_floor(bench: Bench, plan: Plan) -> SendFloor:
    """The machine floor, before the scenarios; a failure is reported, not raised."""
    started = time.monotonic()
    print("  machine floor (send) ...", end=" ", flush=True)
    try:
        floor = await run_send_floor(bench, plan)
    except Exception as exc:  # the scenarios still run
        floor = SendFloor(SEND_FLOOR, error=_one_line(exc))
        floor.raw = {"traceback": traceback.format_exc()}
    finally:
        await bench.processes.stop_all()
    floor.raw["elapsed_s"] = time.monotonic() - started
    outcome = f"ERROR {floor.error}" if floor.error else f"{floor.us_per_send:.2f} µs/send"
    print(f"{floor.raw['elapsed_s']:.1f} s, {outcome}", flush=True)
    return floor


async def run_one(bench: Bench, key: str, kind: str, plan: Plan) -> Row:
    """Run one scenario against one server; a failure becomes a row with its error."""
    started = time.monotonic()
    print(f"  ({key}) {kind} ...", end=" ", flush=True)
    try:
        row = await run_scenario(bench, key, kind, plan)
    except Exception as exc:  # one failed run must not end the others
        row = Row(key, kind, title_of(key, plan), error=_one_line(exc))
        row.raw = {"traceback": traceback.format_exc()}
    finally:
        await bench.processes.stop_all()
    row.raw["elapsed_s"] = time.monotonic() - started
    outcome = f"ERROR {row.error}" if row.error else "ok"
    print(f"{row.raw['elapsed_s']:.1f} s, {outcome}", flush=True)
    return row


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:200]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        status = asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        # Ctrl-C (asyncio.run cancels the run) or SIGTERM (our handler does): every
        # `finally` on the way out has stopped the processes it started.
        print("\ninterrupted: every process started has been stopped", file=sys.stderr)
        status = 130
    raise SystemExit(status)
