"""The load-test tool (`python -m server.loadtest`): its pure parts, and whole runs against a
real Chorus serving the embedded mock upstream on real sockets."""

from __future__ import annotations

import asyncio
import io
import socket
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from server.app import create_app
from server.config import load_settings
from server.loadtest import cli
from server.loadtest.cli import Options, UsageError, check_target, is_loopback_host, parse_options
from server.loadtest.report import build_report
from server.loadtest.runner import (
    ConversationState,
    LoadTestConfig,
    LoadTestResult,
    StopReason,
    run_load_test,
)
from server.loadtest.stats import (
    Distribution,
    SequenceChecker,
    Snapshot,
    check_sequence,
    percentile,
    text_digest,
)
from server.loadtest.subscriber import DONE, INTERRUPTED, TURN_ERROR, SubscriberRecord
from server.mock import mock_answer
from server.sse import ServerSentEvent

PROMPT = "How do twenty viewers share one answer?"


async def start_chorus(aiohttp_server: Any, **environ: str) -> str:
    """A Chorus with the embedded mock (unpaced unless overridden); its base URL."""
    settings = load_settings(
        config_path=None,
        environ={"CHORUS_MOCK_CHUNKS_PER_SECOND": "0", **environ},
        force_mock=True,
    )
    server = await aiohttp_server(create_app(settings))
    return str(server.make_url("")).rstrip("/")


async def get_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
            return body


async def start_and_finish_conversation(base_url: str) -> dict[str, Any]:
    """Create a conversation and read its events until turn 0 is done; return its state."""
    async with aiohttp.ClientSession() as session:
        body = {"messages": [{"role": "user", "content": PROMPT}]}
        async with session.post(f"{base_url}/v1/conversations", json=body) as response:
            assert response.status == 201
            conversation_id = (await response.json())["id"]
        async with session.get(f"{base_url}/v1/conversations/{conversation_id}/events") as events:
            raw = b""
            while b"event: done" not in raw:
                chunk = await events.content.readany()
                assert chunk, "stream closed before done"
                raw += chunk
    return await get_json(f"{base_url}/v1/conversations/{conversation_id}")


def loadtest_tasks() -> list[asyncio.Task[Any]]:
    return [
        task for task in asyncio.all_tasks()
        if task.get_name().startswith("loadtest:") and not task.done()
    ]


# --- pure parts -----------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_distribution_of_values_and_of_none() -> None:
    assert Distribution.of([0.003, 0.001, 0.002], scale=1000.0) == Distribution(
        count=3, p50=2.0, p99=3.0, max=3.0
    )
    assert Distribution.of([]) == Distribution(count=0, p50=None, p99=None, max=None)


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([1, 2, 3, 4], dict(complete=True, missing=0, gaps=0, duplicates=0, out_of_order=0)),
        ([1, 2, 4, 5], dict(complete=False, missing=1, gaps=1, duplicates=0, out_of_order=0)),
        ([1, 4, 5, 9], dict(complete=False, missing=5, gaps=2, duplicates=0, out_of_order=0)),
        ([2, 3], dict(complete=False, missing=1, gaps=1, duplicates=0, out_of_order=0)),
        ([1, 2, 2, 3], dict(complete=False, missing=0, gaps=0, duplicates=1, out_of_order=0)),
        ([1, 2, 3, 1], dict(complete=False, missing=0, gaps=0, duplicates=1, out_of_order=0)),
        ([1, 3, 2, 4], dict(complete=False, missing=0, gaps=0, duplicates=0, out_of_order=1)),
        ([1, 4, 3, 2, 5], dict(complete=False, missing=0, gaps=0, duplicates=0, out_of_order=2)),
        ([], dict(complete=False, missing=0, gaps=0, duplicates=0, out_of_order=0)),
    ],
)
def test_check_sequence(ids: list[int], expected: dict[str, Any]) -> None:
    report = check_sequence(ids)
    assert {key: getattr(report, key) for key in expected} == expected
    assert report.snapshot_jumps == 0


def test_check_sequence_snapshot_jumps_forward() -> None:
    first = check_sequence([Snapshot(40), 41, 42])
    assert (first.complete, first.snapshot_jumps, first.missing) == (True, 1, 0)
    middle = check_sequence([1, 2, Snapshot(40), 41])
    assert (middle.complete, middle.snapshot_jumps, middle.missing) == (True, 1, 0)
    # After a snapshot, the live events must still follow it with no gap or repeat.
    gap_after = check_sequence([Snapshot(40), 42])
    assert (gap_after.complete, gap_after.missing) == (False, 1)
    repeat = check_sequence([Snapshot(40), 40, 41])
    assert (repeat.complete, repeat.duplicates) == (False, 1)
    backwards = check_sequence([1, 2, 3, Snapshot(2)])
    assert (backwards.complete, backwards.out_of_order, backwards.snapshot_jumps) == (False, 1, 0)


def test_check_sequence_with_any_start_and_invalid_ids() -> None:
    assert check_sequence([7, 8, 9], start=None).complete
    assert not check_sequence([7, 8, 10], start=None).complete
    checker = SequenceChecker()
    checker.feed(1)
    checker.feed_invalid()
    report = checker.report()
    assert (report.complete, report.invalid, report.count) == (False, 1, 2)


def event(kind: str, seq: int | None, payload: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(
        data=orjson.dumps(payload).decode(), event=kind, id=None if seq is None else str(seq)
    )


def test_record_assembles_a_snapshot_then_live_answers() -> None:
    record = SubscriberRecord(conversation_id="c", index=0)
    snapshot = {"seq": 40, "turns": [{"turn": 0, "status": "streaming", "choices": [
        {"choice": 0, "content": "Hello"}, {"choice": 1, "content": "other"}]}]}
    events = [
        event("turn", 1, {"turn": 0, "model": "m"}),
        event("answer", 2, {"turn": 0, "choice": 0, "content": "Hel"}),
        # A subscriber that fell behind: the snapshot replaces what it had assembled.
        event("snapshot", 40, snapshot),
        event("answer", 41, {"turn": 0, "choice": 0, "content": " wor"}),
        event("answer", 42, {"turn": 0, "choice": 1, "content": "not choice 0"}),
        event("answer", 43, {"turn": 0, "choice": 0, "content": "ld"}),
        event("done", 44, {"turn": 0, "finish_reason": "stop", "choices": []}),
    ]
    times = [0.5, 0.5, 1.0, 1.5, 1.5, 2.0, 4.0]
    finished = [record.observe(e, now) for e, now in zip(events, times)]
    assert finished == [False] * 6 + [True]
    assert record.outcome == DONE and record.error_kind is None
    assert (record.answer.hexdigest, record.answer.chars) == (text_digest("Hello world"), 11)
    assert list(record.gaps) == [0.0, 0.5, 0.5, 0.0, 0.5, 2.0]
    report = record.sequence.report()
    assert (report.complete, report.snapshot_jumps, report.count) == (True, 1, 7)


def test_record_ends_on_turn_error_end_and_finished_snapshot() -> None:
    failed = SubscriberRecord(conversation_id="c", index=0)
    assert failed.observe(event("turn", 1, {"turn": 0, "model": "m"}), 0.0) is False
    assert failed.observe(event("error", 2, {"turn": 0, "code": "upstream_timeout"}), 0.1)
    assert (failed.outcome, failed.error_kind) == (TURN_ERROR, "error:upstream_timeout")

    ended = SubscriberRecord(conversation_id="c", index=1)
    ended.observe(event("turn", 1, {"turn": 0, "model": "m"}), 0.0)
    # `end` carries no id; the decoder repeats the last one, which must not count twice.
    assert ended.observe(ServerSentEvent(data='{"reason":"deleted"}', event="end", id="1"), 0.1)
    assert ended.error_kind == "end:deleted"
    assert ended.sequence.report().duplicates == 0

    late = SubscriberRecord(conversation_id="c", index=2)
    done_turn = {"turn": 0, "status": "done", "choices": [{"choice": 0, "content": "All."}]}
    assert late.observe(event("snapshot", 9, {"seq": 9, "turns": [done_turn]}), 0.0)
    assert late.outcome == DONE and late.answer.hexdigest == text_digest("All.")


def finished_record(conversation_id: str, index: int, answer: str) -> SubscriberRecord:
    record = SubscriberRecord(conversation_id=conversation_id, index=index)
    record.observe(event("turn", 1, {"turn": 0, "model": "m"}), 0.0)
    record.observe(event("answer", 2, {"turn": 0, "choice": 0, "content": answer}), 0.0)
    record.observe(event("done", 3, {"turn": 0, "choices": []}), 0.0)
    return record


def result_of(records: list[SubscriberRecord], states: list[ConversationState]) -> LoadTestResult:
    return LoadTestResult(
        config=LoadTestConfig(base_url="http://127.0.0.1:1"),
        conversation_ids=tuple(state.id for state in states),
        records=tuple(records),
        states=tuple(states),
        stop_reason=StopReason.FINISHED,
        started_at=0.0,
        ended_at=1.0,
    )


def test_report_flags_different_answers_and_a_mismatch_with_the_state() -> None:
    records = [
        finished_record("a", 0, "same"), finished_record("a", 1, "same"),
        finished_record("b", 0, "one"), finished_record("b", 1, "two"),
        finished_record("c", 0, "ours"),
    ]
    states = [
        ConversationState(id="a", status="done", content="same"),
        ConversationState(id="b", status="done", content="one"),
        ConversationState(id="c", status="done", content="theirs"),
    ]
    report = build_report(result_of(records, states))
    a, b, c = report.conversations
    assert (a.identical, a.matches_state) == (True, True)
    assert (b.identical, b.matches_state, len(b.answers)) == (False, None, 2)
    assert (c.identical, c.matches_state) == (True, False)
    assert report.completeness.complete == 5 and report.errors == {}
    assert report.identical_conversations == 1
    assert not report.ok
    assert build_report(result_of(records[:2], states[:1])).ok


# --- the target guard and the command line --------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a client session or a socket connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the load test tried to connect")

    monkeypatch.setattr(aiohttp, "ClientSession", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3:8000",
        "http://example.com",
        "https://localhost.example.com/",
        "http://127.0.0.1.nip.io:8000",
        "http://[2001:db8::1]:8000",
        "http://0.0.0.0:8000",
        "http://192.168.1.10",
    ],
)
def test_refuses_a_non_loopback_target_before_connecting(
    url: str, no_network: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--url", url, "--subscribers", "5"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "refusing to load-test" in err and "--allow-remote" in err


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.3.4.5", "localhost", "LocalHost", "::1", "::ffff:127.0.0.1"]
)
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


def test_allow_remote_accepts_any_host_without_connecting(no_network: None) -> None:
    with pytest.raises(UsageError):
        check_target("http://10.1.2.3:8000", allow_remote=False)
    assert check_target("http://10.1.2.3:8000/", allow_remote=True) == "http://10.1.2.3:8000"
    options = parse_options(["--url", "http://10.1.2.3:8000", "--allow-remote"])
    assert options.config.base_url == "http://10.1.2.3:8000"


@pytest.mark.parametrize(
    "argv",
    [
        ["--subscribers", "0"],
        ["--conversations", "-1"],
        ["--attach", "abc", "--conversations", "2"],
        ["--attach", "abc", "--prompt", "hi"],
        ["--attach", "../etc/passwd"],
        ["--attach", "abc", "--attach", "abc"],
        ["--duration", "0"],
        ["--ramp", "5", "--duration", "2"],
        ["--url", "ftp://127.0.0.1:8000"],
        ["--url", "http://127.0.0.1:99999"],
        ["--progress", "--no-progress"],
    ],
)
def test_usage_errors_exit_2_without_connecting(
    argv: list[str], no_network: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_too_many_subscribers_for_the_fd_hard_limit_is_a_usage_error() -> None:
    soft, hard = cli.fd_limits()
    if hard == cli.resource.RLIM_INFINITY:
        pytest.skip("no finite hard limit on open files here")
    with pytest.raises(UsageError, match="hard limit"):
        cli.raise_fd_limit(hard + 1)
    assert cli.fd_limits() == (soft, hard)


# --- whole runs against Chorus --------------------------------------------------------------


async def test_started_conversations_are_complete_and_identical(aiohttp_server: Any) -> None:
    base_url = await start_chorus(aiohttp_server)
    result = await run_load_test(
        LoadTestConfig(base_url=base_url, conversations=2, subscribers=20, prompt=PROMPT,
                       duration_seconds=30.0)
    )
    report = build_report(result)
    expected = mock_answer([{"role": "user", "content": PROMPT}])

    assert result.stop_reason == StopReason.FINISHED
    assert len(result.records) == 40
    assert (report.subscribers.connected, report.subscribers.finished_ok) == (40, 40)
    assert (report.completeness.complete, report.completeness.percent) == (40, 100.0)
    assert report.errors == {}
    assert report.ok
    assert len(report.conversations) == 2
    for conversation in report.conversations:
        state = await get_json(f"{base_url}/v1/conversations/{conversation.id}")
        content = state["turns"][0]["choices"][0]["content"]
        assert content == expected
        assert conversation.identical and conversation.matches_state
        assert [(a.sha256, a.chars, a.subscribers) for a in conversation.answers] == [
            (text_digest(content), len(content), 20)
        ]
        records = [r for r in result.records if r.conversation_id == conversation.id]
        # Every subscriber received every event of the conversation, exactly once.
        assert {r.events for r in records} == {state["last_seq"]}
    assert report.events.delivered == sum(r.events for r in result.records)
    assert report.time_to_first_event_ms.count == 40
    assert loadtest_tasks() == []


async def test_attach_mode_replays_a_finished_conversation(aiohttp_server: Any) -> None:
    base_url = await start_chorus(aiohttp_server)
    state = await start_and_finish_conversation(base_url)
    options = parse_options(["--url", base_url, "--attach", state["id"], "--subscribers", "15",
                             "--no-progress", "--duration", "30"])
    stdout, stderr = io.StringIO(), io.StringIO()
    assert await cli.run_cli(options, stdout=stdout, stderr=stderr) == 0, stdout.getvalue()
    table = stdout.getvalue()
    assert "finished ok 15" in table
    assert "completeness          15/15 (100.0%)   via snapshot 0" in table
    content = state["turns"][0]["choices"][0]["content"]
    assert f"{state['id']}  turn 0 done   finished 15/15   identical, equal to GET state " \
           f"({len(content):,} chars)" in table
    assert table.endswith("result: OK\n")
    assert stderr.getvalue() == ""


async def test_subscribers_past_the_replay_buffer_get_a_snapshot(aiohttp_server: Any) -> None:
    base_url = await start_chorus(aiohttp_server, CHORUS_HUB_BUFFER_EVENTS="4")
    state = await start_and_finish_conversation(base_url)
    result = await run_load_test(
        LoadTestConfig(base_url=base_url, attach=(state["id"],), subscribers=10,
                       duration_seconds=30.0)
    )
    report = build_report(result)
    assert report.completeness.complete == 10 and report.completeness.with_snapshot == 10
    assert all(r.events == 1 for r in result.records)  # the snapshot alone: turn 0 is done
    (conversation,) = report.conversations
    assert conversation.identical and conversation.matches_state
    assert conversation.answers[0].sha256 == text_digest(state["turns"][0]["choices"][0]["content"])
    assert report.ok


async def test_attach_to_an_unknown_conversation_fails_with_one_line(aiohttp_server: Any) -> None:
    base_url = await start_chorus(aiohttp_server)
    options = parse_options(["--url", base_url, "--attach", "nope", "--no-progress"])
    stdout, stderr = io.StringIO(), io.StringIO()
    assert await cli.run_cli(options, stdout=stdout, stderr=stderr) == 1
    assert stdout.getvalue() == ""
    assert stderr.getvalue() == (
        "python -m server.loadtest: error: cannot attach to conversation nope: GET answered "
        "404 conversation_not_found: conversation not found\n"
    )


async def test_duration_bounds_a_run_and_reports_timeouts(aiohttp_server: Any) -> None:
    # At 2 chunks/s the mock answer takes about a minute: the run must end at --duration.
    base_url = await start_chorus(aiohttp_server, CHORUS_MOCK_CHUNKS_PER_SECOND="2")
    options = parse_options(["--url", base_url, "--subscribers", "5", "--duration", "1",
                             "--json", "-", "--no-progress"])
    stdout, stderr = io.StringIO(), io.StringIO()
    loop = asyncio.get_running_loop()
    started = loop.time()
    status = await cli.run_cli(options, stdout=stdout, stderr=stderr)
    elapsed = loop.time() - started

    assert status == 1
    assert 1.0 <= elapsed < 4.0
    report = orjson.loads(stdout.getvalue())
    assert report["stop_reason"] == "duration"
    assert report["subscribers"] == {"total": 5, "connected": 5, "finished_ok": 0, "failed": 0,
                                     "timed_out": 5, "interrupted": 0}
    assert report["errors"] == {"timeout": 5}
    assert report["completeness"]["complete"] == 0
    assert report["conversations"][0]["turn_status"] == "streaming"
    assert report["conversations"][0]["identical"] is None
    assert report["time_to_first_event_ms"]["count"] == 5  # what was measured is kept
    assert report["ok"] is False
    assert loadtest_tasks() == []


async def test_stop_ends_the_run_and_keeps_the_measurements(aiohttp_server: Any) -> None:
    base_url = await start_chorus(aiohttp_server, CHORUS_MOCK_CHUNKS_PER_SECOND="2")
    stop = asyncio.Event()

    def on_progress(counters: Any, elapsed: float) -> None:
        if counters.connected == counters.total and counters.events >= counters.total:
            stop.set()

    result = await run_load_test(
        LoadTestConfig(base_url=base_url, subscribers=4, duration_seconds=30.0),
        stop=stop, on_progress=on_progress,
    )
    assert result.stop_reason == StopReason.INTERRUPTED
    assert result.ended_at - result.started_at < 10.0
    assert [r.outcome for r in result.records] == [INTERRUPTED] * 4
    assert all(r.events >= 1 and r.sequence.report().missing == 0 for r in result.records)
    assert build_report(result).errors == {"interrupted": 4}
    assert loadtest_tasks() == []


async def test_json_report_shape(aiohttp_server: Any, tmp_path: Path) -> None:
    base_url = await start_chorus(aiohttp_server)
    path = tmp_path / "report.json"
    options = parse_options(["--url", base_url, "--conversations", "2", "--subscribers", "3",
                             "--json", str(path), "--no-progress"])
    assert isinstance(options, Options)
    stdout, stderr = io.StringIO(), io.StringIO()
    assert await cli.run_cli(options, stdout=stdout, stderr=stderr) == 0
    assert stdout.getvalue().startswith("Chorus load test  ")  # the table, as well
    report = orjson.loads(path.read_bytes())
    assert set(report) == {
        "ok", "url", "stop_reason", "duration_seconds", "duration_limit_seconds",
        "conversations", "subscribers", "events", "time_to_first_event_ms",
        "inter_event_gap_ms", "completeness", "identical_conversations", "errors",
    }
    assert report["ok"] is True and report["url"] == base_url
    assert report["subscribers"] == {"total": 6, "connected": 6, "finished_ok": 6, "failed": 0,
                                     "timed_out": 0, "interrupted": 0}
    assert set(report["events"]) == {"delivered", "per_second", "window_seconds"}
    for key in ("time_to_first_event_ms", "inter_event_gap_ms"):
        assert set(report[key]) == {"count", "p50", "p99", "max"}
        assert all(isinstance(report[key][k], float) for k in ("p50", "p99", "max"))
    assert report["completeness"] == {
        "complete": 6, "total": 6, "percent": 100.0, "with_snapshot": 0, "missing_ids": 0,
        "duplicate_ids": 0, "out_of_order_ids": 0, "invalid_ids": 0,
    }
    assert report["identical_conversations"] == 2 and report["errors"] == {}
    for conversation in report["conversations"]:
        assert set(conversation) == {
            "id", "subscribers", "finished", "complete", "turn_status", "identical",
            "matches_state", "state_sha256", "state_chars", "state_error", "answers",
        }
        assert conversation["turn_status"] == "done" and conversation["state_error"] is None
        (answer,) = conversation["answers"]
        assert answer == {"sha256": conversation["state_sha256"],
                          "chars": conversation["state_chars"], "subscribers": 3}
