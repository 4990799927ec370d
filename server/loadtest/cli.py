"""`python -m server.loadtest`: arguments, the loopback guard, the fd limit and `main`.

Everything here happens before the first connection: a bad argument or a non-loopback
target (without `--allow-remote`) ends the program with one line and exit status 2, and
no socket is ever opened.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import re
import resource
import signal
import sys
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit

from .report import build_report, render_json, render_table
from .runner import DEFAULT_PROMPT, LoadTestConfig, LoadTestError, run_load_test
from .subscriber import LiveCounters

__all__ = [
    "Options",
    "ProgressLine",
    "UsageError",
    "check_target",
    "is_loopback_host",
    "main",
    "parse_options",
    "raise_fd_limit",
    "run_cli",
]

PROG = "python -m server.loadtest"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# File descriptors kept for everything that is not a subscriber's socket.
FD_RESERVE = 64
_CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class UsageError(Exception):
    """A bad command line; the message is the one line printed before exiting with 2."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    config: LoadTestConfig
    json_path: str | None = None
    # None: draw the progress line only when stderr is a terminal.
    progress: bool | None = None

    @property
    def total_subscribers(self) -> int:
        count = len(self.config.attach) or self.config.conversations
        return count * self.config.subscribers


def is_loopback_host(host: str) -> bool:
    """True for "localhost", 127.0.0.0/8 and ::1 (also as ::ffff:127.x.y.z). No DNS."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_target(url: str, *, allow_remote: bool) -> str:
    """The base URL without a trailing slash; UsageError if malformed or not loopback."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError:
        raise UsageError(f"--url {url!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url must be an http:// or https:// URL with a host, got {url!r}")
    if parts.query or parts.fragment:
        raise UsageError(f"--url must be a base URL without ?query or #fragment, got {url!r}")
    if not allow_remote and not is_loopback_host(parts.hostname):
        raise UsageError(
            f"refusing to load-test {parts.hostname!r}: not a loopback address "
            "(127.0.0.0/8, ::1, localhost); pass --allow-remote for a server you run"
        )
    return url.rstrip("/")


def fd_limits() -> tuple[int, int]:
    """The (soft, hard) open-file limits of this process."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_fd_limit(needed: int) -> int:
    """Raise the soft open-file limit towards the hard one; return the new soft limit.

    Raises UsageError when `needed` descriptors cannot fit under the hard limit.
    """
    soft, hard = fd_limits()
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise UsageError(
            f"{needed - FD_RESERVE:,} subscribers need about {needed:,} open files, but this "
            f"process may open at most {hard:,} (hard limit); run fewer, split the run "
            "across processes, or raise the hard limit (ulimit -Hn, /etc/security/limits.conf)"
        )
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            if needed > soft:
                raise UsageError(
                    f"cannot raise the open-file limit from {soft:,} to {needed:,}: {error}"
                ) from None
    return soft


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    soft, hard = fd_limits()
    hard_text = "unlimited" if hard == resource.RLIM_INFINITY else f"{hard:,}"
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Load-test a Chorus server: start conversations (or attach to existing ones), "
            "attach many SSE subscribers to each, and check that every subscriber receives "
            "every event of turn 0 exactly once, in order, and assembles the same answer "
            "as GET /v1/conversations/{id}."
        ),
        epilog=(
            "Exit status: 0 when every subscriber was complete and every conversation's "
            "answers identical (and equal to the server's state), 1 otherwise (including a "
            "timeout or a turn that ended in error), 2 for a usage error. "
            "Each subscriber holds one socket, so one file descriptor; the tool raises its "
            f"soft open-file limit to the hard limit (here soft {soft:,}, hard {hard_text}) and "
            f"refuses to start when subscribers x conversations + {FD_RESERVE} is above it. "
            "The server needs as many descriptors: start it from a shell with "
            "'ulimit -n' raised too."
        ),
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="Chorus base URL (default %(default)s); must be loopback unless "
                             "--allow-remote")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a non-loopback --url (only against a server you run)")
    parser.add_argument("--conversations", type=_positive_int, default=None, metavar="M",
                        help="conversations to start with POST /v1/conversations (default 1)")
    parser.add_argument("--prompt", default=None,
                        help="the user message of each started conversation")
    parser.add_argument("--model", default=None, help="model of each started conversation")
    parser.add_argument("--attach", action="append", default=[], metavar="ID",
                        help="attach to this existing conversation instead (repeatable)")
    parser.add_argument("--subscribers", type=_positive_int, default=100, metavar="N",
                        help="SSE subscribers per conversation (default %(default)s); each "
                             f"needs one file descriptor (hard limit here: {hard_text})")
    parser.add_argument("--ramp", type=_seconds, default=0.0, metavar="SECONDS",
                        help="spread the subscribers' connects evenly over this many seconds "
                             "(default: all at once)")
    parser.add_argument("--duration", type=_seconds, default=60.0, metavar="SECONDS",
                        help="hard limit for the whole run; subscribers still reading then "
                             "are cancelled and reported as timed out (default %(default)g)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                        help="also write the report as JSON to PATH ('-': JSON on stdout "
                             "instead of the table)")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="draw the progress line on stderr even when it is not a TTY")
    progress.add_argument("--no-progress", dest="progress", action="store_false",
                          help="never draw the progress line")
    return parser


def parse_options(argv: list[str] | None) -> Options:
    """Parse and check the command line. UsageError for a bad combination; argparse
    itself exits (SystemExit) for a malformed flag and for --help."""
    args = build_parser().parse_args(argv)
    base_url = check_target(args.url, allow_remote=args.allow_remote)
    attach = tuple(args.attach)
    if attach:
        if args.conversations is not None:
            raise UsageError("use either --conversations or --attach, not both")
        if args.prompt is not None or args.model is not None:
            raise UsageError("--prompt and --model apply only to started conversations, "
                             "not with --attach")
        for conversation_id in attach:
            if not _CONVERSATION_ID.fullmatch(conversation_id):
                raise UsageError(f"--attach {conversation_id!r} is not a conversation id")
        if len(set(attach)) != len(attach):
            raise UsageError("--attach names the same conversation twice")
    if args.duration <= 0:
        raise UsageError("--duration must be more than 0 seconds")
    if args.ramp >= args.duration:
        raise UsageError(f"--ramp ({args.ramp:g} s) must be shorter than --duration "
                         f"({args.duration:g} s)")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt must not be empty")
    return Options(
        config=LoadTestConfig(
            base_url=base_url,
            conversations=args.conversations or 1,
            prompt=args.prompt if args.prompt is not None else DEFAULT_PROMPT,
            model=args.model,
            attach=attach,
            subscribers=args.subscribers,
            ramp_seconds=args.ramp,
            duration_seconds=args.duration,
        ),
        json_path=args.json_path,
        progress=args.progress,
    )


class ProgressLine:
    """One status line on a terminal, redrawn in place (carriage return, erase line)."""

    __slots__ = ("_stream", "_duration", "_last", "_drawn")

    def __init__(self, stream: TextIO, *, duration: float) -> None:
        self._stream = stream
        self._duration = duration
        self._last = (0.0, 0)
        self._drawn = False

    def draw(self, counters: LiveCounters, elapsed: float) -> None:
        last_elapsed, last_events = self._last
        span = elapsed - last_elapsed
        rate = (counters.events - last_events) / span if span > 0 else 0.0
        self._last = (elapsed, counters.events)
        self._stream.write(
            f"\r{elapsed:6.1f}/{self._duration:g} s  connected {counters.connected:,}"
            f"/{counters.total:,}  finished {counters.finished:,}  events "
            f"{counters.events:,}  {rate:,.0f} events/s\x1b[K"
        )
        self._stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


async def run_cli(
    options: Options,
    *,
    stdout: TextIO,
    stderr: TextIO,
    handle_signals: bool = False,
) -> int:
    """Run the load test and print the report; return the exit status.

    With `handle_signals`, the first SIGINT/SIGTERM stops the run (subscribers are
    cancelled, awaited and reported); a second Ctrl-C aborts at once.
    """
    stop = asyncio.Event()
    show_progress = options.progress if options.progress is not None else stderr.isatty()
    progress = ProgressLine(stderr, duration=options.config.duration_seconds)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()

    def on_signal() -> None:
        progress.clear()
        stderr.write("stopping: cancelling subscribers (Ctrl-C again to abort)\n")
        stop.set()
        for sig in signals:
            loop.remove_signal_handler(sig)

    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        result = await run_load_test(
            options.config, stop=stop, on_progress=progress.draw if show_progress else None
        )
    except LoadTestError as error:
        progress.clear()
        stderr.write(f"{PROG}: error: {error}\n")
        return EXIT_FAILED
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    progress.clear()
    report = build_report(result)
    if options.json_path == "-":
        stdout.write(render_json(report).decode())
    else:
        stdout.write(render_table(report))
    if options.json_path not in (None, "-"):
        try:
            with open(options.json_path, "wb") as handle:
                handle.write(render_json(report))
        except OSError as error:
            stderr.write(f"{PROG}: error: cannot write {options.json_path}: {error}\n")
            return EXIT_FAILED
    return EXIT_OK if report.ok else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """The program: parse, check the target and the fd limit, run, report."""
    try:
        options = parse_options(argv)
        raise_fd_limit(options.total_subscribers + FD_RESERVE)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_:
        # argparse: --help (0) or a malformed flag (2, after printing usage).
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(
            run_cli(options, stdout=sys.stdout, stderr=sys.stderr, handle_signals=True)
        )
    except KeyboardInterrupt:
        print(f"{PROG}: aborted", file=sys.stderr)
        return 130
