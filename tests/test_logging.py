"""Logs: one line per request, one per lifecycle step with the conversation id, and the
JSON format (`server.log_format = "json"`), which never carries the upstream key."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from server.logging_setup import JsonFormatter

from .conftest import StartChorus, eventually, wait_until_serving
from .fake_upstream import FakeUpstream, Hang, Respond, Script, Send, answer_script, chunk, sse

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-test-SECRET-key-0123456789"  # what make_settings and the test below use
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# --- the JSON formatter -------------------------------------------------------------------


def _record(message: str, *args: object, **attributes: Any) -> logging.LogRecord:
    record = logging.LogRecord("server.example", logging.INFO, __file__, 1, message, args, None)
    record.created = 86400.5
    for name, value in attributes.items():
        setattr(record, name, value)
    return record


def test_json_lines_have_the_documented_fields() -> None:
    line = JsonFormatter().format(_record("conversation %s created (%d messages)", "abc", 2))
    assert orjson.loads(line) == {
        "ts": "1970-01-02T00:00:00.500Z",
        "level": "INFO",
        "logger": "server.example",
        "message": "conversation abc created (2 messages)",
    }


def test_json_lines_carry_the_conversation_when_the_record_does() -> None:
    line = JsonFormatter().format(_record("turn %d done", 0, conversation="abc"))
    assert orjson.loads(line)["conversation"] == "abc"


def test_json_lines_stay_one_line_with_newlines_and_tracebacks() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = _record("failed:\n%s", "two\nlines", exc_info=sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["message"] == "failed:\ntwo\nlines"
    assert entry["exc_info"].startswith("Traceback (most recent call last):\n")
    assert entry["exc_info"].endswith("ValueError: bad\nthing")
    assert set(entry) == {"ts", "level", "logger", "message", "exc_info"}


def test_other_extras_are_not_copied() -> None:
    line = JsonFormatter().format(_record("hello", api_key=SECRET, prompt="a prompt"))
    assert set(orjson.loads(line)) == {"ts", "level", "logger", "message"}
    assert SECRET not in line


def test_configure_logging_in_both_formats() -> None:
    program = (
        "import logging, sys\n"
        "from server.logging_setup import configure_logging\n"
        "configure_logging(sys.argv[1], sys.argv[2])\n"
        "log = logging.getLogger('server.example')\n"
        "log.debug('hidden at info')\n"
        "log.info('turn %d started', 0, extra={'conversation': 'c1'})\n"
        "logging.getLogger('aiohttp.access').info('GET / 200')\n"
    )

    def run(level: str, fmt: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-c", program, level, fmt],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True,
        )
        assert result.stdout == ""
        return result.stderr.splitlines()

    entries = [orjson.loads(line) for line in run("info", "json")]
    assert [(e["level"], e["logger"], e["message"], e.get("conversation")) for e in entries] == [
        ("INFO", "server.example", "turn 0 started", "c1"),
        ("INFO", "aiohttp.access", "GET / 200", None),
    ]
    assert all(TS.match(e["ts"]) for e in entries)
    lines = run("DEBUG", "text")
    assert [line.split(" ", 2)[2] for line in lines] == [
        "DEBUG server.example: hidden at info",
        "INFO server.example: turn 0 started",
        "INFO aiohttp.access: GET / 200",
    ]
    with pytest.raises(subprocess.CalledProcessError) as failed:
        run("info", "xml")
    assert "ValueError: log format must be one of ('text', 'json'), got 'xml'" in (
        failed.value.stderr
    )


# --- lifecycle lines ----------------------------------------------------------------------


def lifecycle(caplog: pytest.LogCaptureFixture, conversation_id: str) -> list[str]:
    """The messages logged with this conversation as their `conversation` field."""
    records = [r for r in caplog.records if getattr(r, "conversation", None) == conversation_id]
    assert all(r.levelno == logging.INFO for r in records)
    return [r.getMessage() for r in records]


PROMPT = [{"role": "user", "content": "PROMPT-MARKER tell me a story"}]


async def test_every_lifecycle_step_is_one_line_with_the_conversation(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    chorus = await start_chorus(hub={"max_conversations": 2})
    registry = chorus.registry

    # One done, then a follow-up done.
    fake_upstream.enqueue(answer_script(["one"]), answer_script(["two"]))
    first = (await chorus.create(messages=PROMPT))["id"]
    await eventually(lambda: not registry.get(first).streaming)
    response = await chorus.client.post(
        f"/v1/conversations/{first}/messages", json={"content": "PROMPT-MARKER again"}
    )
    assert response.status == 202
    await eventually(lambda: not registry.get(first).streaming)

    # One cancelled.
    fake_upstream.enqueue(Script([Send(sse(chunk(role="assistant", content=""))), Hang()]))
    second = (await chorus.create(messages=PROMPT))["id"]
    await eventually(lambda: fake_upstream.calls == 3)
    response = await chorus.client.post(f"/v1/conversations/{second}/cancel")
    assert response.status == 202

    # A third evicts the first (max_conversations = 2; it finished first); then deleted.
    fake_upstream.enqueue(answer_script(["three"]))
    third = (await chorus.create(messages=PROMPT))["id"]
    await eventually(lambda: not registry.get(third).streaming)
    response = await chorus.client.delete(f"/v1/conversations/{third}")
    assert response.status == 204

    assert lifecycle(caplog, first) == [
        f"conversation {first} created (model test-model, 1 messages)",
        f"conversation {first}: turn 0 started (model test-model)",
        f"conversation {first}: turn 0 done (stop)",
        f"conversation {first}: turn 1 started (model test-model)",
        f"conversation {first}: turn 1 done (stop)",
        f"conversation {first} evicted to make room (max_conversations)",
    ]
    assert lifecycle(caplog, second) == [
        f"conversation {second} created (model test-model, 1 messages)",
        f"conversation {second}: turn 0 started (model test-model)",
        f"conversation {second}: turn 0 ended with cancelled: cancelled by request",
        f"conversation {second}: turn cancelled by request",
    ]
    assert lifecycle(caplog, third) == [
        f"conversation {third} created (model test-model, 1 messages)",
        f"conversation {third}: turn 0 started (model test-model)",
        f"conversation {third}: turn 0 done (stop)",
        f"conversation {third} deleted",
    ]
    assert "PROMPT-MARKER" not in caplog.text
    assert SECRET not in caplog.text


async def test_expiry_is_logged_with_the_conversation(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    chorus = await start_chorus(hub={"retention_seconds": 0.05})
    fake_upstream.enqueue(answer_script(["one"]))
    created = (await chorus.create())["id"]
    await eventually(lambda: len(chorus.registry) == 0)
    assert lifecycle(caplog, created)[-2:] == [
        f"conversation {created}: turn 0 done (stop)",
        f"conversation {created} expired",
    ]


# --- python -m server with log_format = "json" ---------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_python_m_server_logs_json_lines_without_the_key(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_upstream.scripts_by_prompt["PROMPT-MARKER fine"] = answer_script(["Hi", " there"])
    # Upstream echoes the key in its error: Chorus must scrub it before it logs anything.
    fake_upstream.scripts_by_prompt["PROMPT-MARKER broken"] = Script([
        Respond(401, orjson.dumps({"error": {"message": f"Incorrect API key provided: {SECRET}"}}))
    ])
    port = free_port()
    env = {
        name: value for name, value in os.environ.items()
        if name != "OPENAI_API_KEY" and not name.startswith("CHORUS_")
    }
    env.update(
        OPENAI_API_KEY=SECRET, CHORUS_SERVER_LOG_FORMAT="json", PYTHONPATH=str(REPO_ROOT)
    )
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(port), "--model", "test-model",
             "--upstream-base-url", fake_upstream.url],
            cwd=tmp_path,  # no config.toml here: defaults, then the environment
            env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_until_serving(f"{base}/readyz", alive=lambda: process.poll() is None)
        async with aiohttp.ClientSession() as session:
            ids = []
            for prompt in ("PROMPT-MARKER fine", "PROMPT-MARKER broken"):
                body = {"messages": [{"role": "user", "content": prompt}]}
                async with session.post(f"{base}/v1/conversations", json=body) as response:
                    assert response.status == 201
                    ids.append((await response.json())["id"])
            fine, broken = ids

            async def ended(conversation_id: str) -> bool:
                url = f"{base}/v1/conversations/{conversation_id}?token=SEEKRIT-TOKEN"
                async with session.get(url) as response:
                    return bool((await response.json())["status"] != "streaming")

            async with asyncio.timeout(15):
                for conversation_id in ids:
                    while not await ended(conversation_id):
                        await asyncio.sleep(0.02)
            async with session.delete(f"{base}/v1/conversations/{fine}") as response:
                assert response.status == 204
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(process.wait, 15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    output = stderr_path.read_text()
    assert returncode == 0, output
    # The key did reach upstream, and nowhere else.
    assert fake_upstream.headers[0]["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in output
    assert "SEEKRIT-TOKEN" not in output
    assert "PROMPT-MARKER" not in output

    entries = [orjson.loads(line) for line in output.splitlines()]
    for entry in entries:
        assert TS.match(entry["ts"]), entry
        assert {"ts", "level", "logger", "message"} <= set(entry) <= {
            "ts", "level", "logger", "message", "conversation", "exc_info",
        }
    messages = {(e["logger"], e["message"], e.get("conversation")) for e in entries}
    assert ("__main__", f"Chorus listening on http://127.0.0.1:{port}/ (event loop: "
            f"{'uvloop' if _has_uvloop() else 'asyncio'})", None) in messages
    for expected in [
        ("server.conversations", f"conversation {fine} created (model test-model, 1 messages)"),
        ("server.turn_runner", f"conversation {fine}: turn 0 started (model test-model)"),
        ("server.turn_runner", f"conversation {fine}: turn 0 done (stop)"),
        ("server.conversations", f"conversation {fine} deleted"),
        ("server.turn_runner", f"conversation {broken}: turn 0 ended with upstream_error: "
         "upstream answered HTTP 401: Incorrect API key provided: [redacted]"),
    ]:
        conversation = fine if fine in expected[1] else broken
        assert (*expected, conversation) in messages, expected
    # aiohttp's access log: one line per request, watch tokens redacted.
    access = [e["message"] for e in entries if e["logger"] == "aiohttp.access"]
    assert any('"GET /readyz HTTP/1.1" 200' in line for line in access), access
    assert sum('"POST /v1/conversations HTTP/1.1" 201' in line for line in access) == 2
    assert any(f"/v1/conversations/{fine}?token=REDACTED " in line for line in access), access
    assert any(f'"DELETE /v1/conversations/{fine} HTTP/1.1" 204' in line for line in access)


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True
