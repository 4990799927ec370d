"""The machine floor: the CPU cost of one small `send()` on a loopback TCP socket here.

    python -m bench.send_floor --conns 1000 --rounds 100 --pause-ms 10 --size 150

Owns the sender process of that measurement (`bench.scenarios.run_send_floor` runs it
against the load client). In (a) and (b) the server's hot path is one `send()` of one
small HTTP chunk to each subscriber per upstream read. The sender does only that, with
nothing of asyncio, aiohttp or Chorus around it, so the CPU it takes is a floor that no
Python server on this machine goes under for as many sends. Standard library only.

- The sender runs where the server under test runs (CPU 0). It listens, and answers each
  of `conns` connections the way an SSE server does: `200`, chunked, one `turn` event.
  Then it sets the socket non-blocking with TCP_NODELAY (as aiohttp does) and, after one
  unmeasured warm-up round, sends one `size`-byte `answer` frame (one HTTP chunk, shared
  by all sockets, as Chorus encodes once) to every socket, `rounds` times, sleeping
  `pause_ms` between rounds: scenario (b)'s pacing. Then `done`, and it closes.
- The reader is the benchmark's own C client (`sse_client.c`) on the load CPU (CPU 1),
  so the sockets are drained exactly as they are in the scenarios: one epoll loop that
  sleeps between rounds and is woken by the sends.
- The cost per send is the sender's CPU time over the measured rounds (getrusage: the
  same utime + stime as /proc/<pid>/stat, in microseconds) divided by the sends. On
  loopback the receiving half of TCP runs in the sender's context and is counted there,
  just as it is in the server's CPU % in the table.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import time
from typing import Any

ACCEPT_TIMEOUT_SECONDS = 30.0
REQUEST_MAX_BYTES = 4096
RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
STREAM_END = b"0\r\n\r\n"


# --- the sender (a separate process; stdlib only) ---------------------------------------------


def http_chunk(frame: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(frame), frame)


def answer_chunk(seq: int, size: int) -> bytes:
    """Event `seq`, an `answer` as the server writes it (one HTTP chunk), padded to `size`."""
    head = b'id: %d\nevent: answer\ndata: {"turn":0,"choice":0,"content":"' % seq
    tail = b'"}\n\n'
    pad = size - len(http_chunk(head + tail))
    if pad < 0:
        raise ValueError(f"size {size} is too small: at least {size - pad} bytes")
    chunk = http_chunk(head + b"w" * pad + tail)
    if len(chunk) != size:  # the hex length grew by a digit: one byte less of padding
        chunk = http_chunk(head + b"w" * (pad - 1) + tail)
    return chunk


def accept_subscriber(listener: socket.socket) -> socket.socket:
    """Accept one connection, read its request, answer with the headers and a `turn` event."""
    peer, _ = listener.accept()
    peer.settimeout(ACCEPT_TIMEOUT_SECONDS)
    request = b""
    while b"\r\n\r\n" not in request:
        data = peer.recv(REQUEST_MAX_BYTES)
        if not data or len(request) + len(data) > REQUEST_MAX_BYTES:
            raise RuntimeError("a client closed or sent an over-long request")
        request += data
    peer.sendall(RESPONSE_HEAD + http_chunk(b'id: 1\nevent: turn\ndata: {"turn":0}\n\n'))
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    peer.setblocking(False)
    return peer


def run_sender(*, conns: int, rounds: int, pause_ms: float, size: int) -> dict[str, Any]:
    """Serve `conns` subscribers, send the rounds, return what the measured rounds cost."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(conns)  # every connect fits in the backlog: no SYN is dropped
    listener.settimeout(ACCEPT_TIMEOUT_SECONDS)
    print(json.dumps({"phase": "listening", "port": listener.getsockname()[1]}), flush=True)
    peers = [accept_subscriber(listener) for _ in range(conns)]
    listener.close()
    pause = pause_ms / 1000.0
    short = 0  # sends that did not take the whole chunk (a full buffer): should stay 0

    def send_round(seq: int) -> float:
        nonlocal short
        chunk = answer_chunk(seq, size)
        started = time.perf_counter()
        for peer in peers:
            try:
                if peer.send(chunk) != len(chunk):
                    short += 1
            except BlockingIOError:
                short += 1
        return time.perf_counter() - started

    # Warm-up: the reader finishes attaching, first-use allocations are made.
    send_round(2)
    time.sleep(pause)
    short = 0
    loop_wall = 0.0
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for index in range(rounds):
        loop_wall += send_round(3 + index)
        if index < rounds - 1:
            time.sleep(pause)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)

    done = http_chunk(b"id: %d\nevent: done\ndata: {}\n\n" % (3 + rounds)) + STREAM_END
    for peer in peers:
        peer.setblocking(True)
        peer.sendall(done)
        peer.close()
    return {
        "phase": "finished",
        "sends": conns * rounds,
        "bytes_per_send": size,
        "short_sends": short,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "wall_s": wall,
        "send_loops_wall_s": loop_wall,
        "involuntary_switches": after.ru_nivcsw - before.ru_nivcsw,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.send_floor",
        description="Send small chunks to SSE subscribers in paced rounds; print the CPU cost.",
    )
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--pause-ms", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=150)
    args = parser.parse_args(argv)
    result = run_sender(
        conns=args.conns, rounds=args.rounds, pause_ms=args.pause_ms, size=args.size
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
