"""Configuration: config.toml, CHORUS_<SECTION>_<KEY> overrides, CLI flags, the API key,
mock mode, and `python -m server` refusing bad values or starting for real."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from server.__main__ import build_settings, parse_args
from server.config import (
    AuthSettings,
    LimitsSettings,
    API_KEY_ENV,
    DEFAULT_UPSTREAM_BASE_URL,
    ConfigError,
    HubSettings,
    MockSettingsSection,
    ServerSettings,
    Settings,
    UpstreamSettings,
    load_settings,
)

from server.sse import SSEDecoder

from .conftest import wait_until_serving

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_TOML = REPO_ROOT / "config.toml"
SECTION_TYPES: dict[str, type[Any]] = {
    "server": ServerSettings,
    "upstream": UpstreamSettings,
    "hub": HubSettings,
    "mock": MockSettingsSection,
    "limits": LimitsSettings,
    "auth": AuthSettings,
}

# What config.toml documents, key by key.
DOCUMENTED = {
    "server": {
        "host": "127.0.0.1",
        "port": 8000,
        "max_body_bytes": 1048576,
        "log_level": "INFO",
        "log_format": "text",
        "event_loop": "auto",
        "shutdown_grace_seconds": 10.0,
        "idempotency_window_seconds": 600.0,
    },
    "upstream": {
        "base_url": "https://api.openai.com/v1",
        "model": "gpt-4o-mini",
        "connect_timeout": 10.0,
        "first_chunk_timeout": 60.0,
        "idle_timeout": 60.0,
        "max_retries": 2,
        "retry_backoff_seconds": 0.5,
        "retry_backoff_max_seconds": 8.0,
        "retry_after_max_seconds": 30.0,
        "total_timeout": 600.0,
        "max_choices": 8,
        "api_key": None,
    },
    "hub": {
        "buffer_events": 4096,
        "buffer_bytes": 4194304,
        "retention_seconds": 600.0,
        "max_conversations": 1000,
        "heartbeat_seconds": 15.0,
        "retry_hint_ms": 2000,
        "send_timeout": 30.0,
        "on_no_subscribers": "keep",
        "idle_grace_seconds": 30.0,
    },
    "mock": {"chunks_per_second": 40.0, "answer_repeat": 1},
    "limits": {
        "max_live_conversations": 256,
        "max_subscribers_per_conversation": 10000,
        "max_subscribers_total": 20000,
        "max_messages": 256,
        "starts_per_minute_per_key": 60,
    },
    "auth": {
        "api_keys_file": "",
        "require_watch_token": False,
        "watch_token_ttl_seconds": 3600.0,
        "cors_origins": (),
    },
    "use_mock": True,
}

# One environment override per key: (section, key, env value, expected setting).
ENV_OVERRIDES: list[tuple[str, str, str, object]] = [
    ("server", "host", "0.0.0.0", "0.0.0.0"),
    ("server", "port", "9001", 9001),
    ("server", "max_body_bytes", " 2048 ", 2048),
    ("server", "log_level", "debug", "debug"),
    ("server", "log_format", "json", "json"),
    ("server", "event_loop", "asyncio", "asyncio"),
    ("server", "shutdown_grace_seconds", "2.5", 2.5),
    ("server", "idempotency_window_seconds", "30", 30.0),
    ("upstream", "total_timeout", "0", 0.0),
    ("hub", "send_timeout", "0.5", 0.5),
    ("hub", "on_no_subscribers", "cancel", "cancel"),
    ("hub", "idle_grace_seconds", "0", 0.0),
    ("limits", "max_live_conversations", "5", 5),
    ("limits", "max_subscribers_per_conversation", "7", 7),
    ("limits", "max_subscribers_total", "0", 0),
    ("limits", "max_messages", "12", 12),
    ("limits", "starts_per_minute_per_key", "3", 3),
    ("auth", "api_keys_file", "/tmp/keys", "/tmp/keys"),
    ("auth", "require_watch_token", "yes", True),
    ("auth", "watch_token_ttl_seconds", "60", 60.0),
    ("auth", "cors_origins", "http://a.test, http://b.test", ("http://a.test", "http://b.test")),
    ("upstream", "base_url", "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"),
    ("upstream", "model", "env-model", "env-model"),
    ("upstream", "connect_timeout", "1.5", 1.5),
    ("upstream", "first_chunk_timeout", "7", 7.0),
    ("upstream", "idle_timeout", "2", 2.0),
    ("upstream", "max_retries", "0", 0),
    ("upstream", "retry_backoff_seconds", "0.25", 0.25),
    ("upstream", "retry_backoff_max_seconds", "3", 3.0),
    ("upstream", "retry_after_max_seconds", "0", 0.0),
    ("upstream", "max_choices", "4", 4),
    ("hub", "buffer_events", "16", 16),
    ("hub", "buffer_bytes", "65536", 65536),
    ("hub", "retention_seconds", "0.5", 0.5),
    ("hub", "max_conversations", "3", 3),
    ("hub", "heartbeat_seconds", "1", 1.0),
    ("hub", "retry_hint_ms", "0", 0),
    ("mock", "chunks_per_second", "0", 0.0),
    ("mock", "answer_repeat", "3", 3),
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No API key and no CHORUS_ variables; the repo root as the working directory."""
    for name in list(os.environ):
        if name == API_KEY_ENV or name.startswith("CHORUS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(REPO_ROOT)
    return monkeypatch


def child_env(**extra: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name != API_KEY_ENV and not name.startswith("CHORUS_")
    }
    env.update(extra)
    return env


# --- loading ----------------------------------------------------------------------------------


def test_config_toml_gives_the_documented_defaults(clean_env: pytest.MonkeyPatch) -> None:
    settings = build_settings(parse_args([]))
    assert dataclasses.asdict(settings) == DOCUMENTED
    # The file and the built-in defaults agree, so running without the file changes nothing.
    assert settings == Settings(use_mock=True)
    assert load_settings(config_path=None, environ={}) == settings


def test_the_default_config_file_is_read(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "config.toml").write_text('[server]\nport = 8123\n[hub]\nbuffer_events = 7\n')
    clean_env.chdir(tmp_path)
    settings = build_settings(parse_args([]))
    assert (settings.server.port, settings.hub.buffer_events) == (8123, 7)
    assert settings.server.host == "127.0.0.1"
    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 8124\n")
    assert build_settings(parse_args(["--config", str(other)])).server.port == 8124


def test_every_key_has_an_environment_override_case() -> None:
    keys = {
        (section, field.name)
        for section, cls in SECTION_TYPES.items()
        for field in dataclasses.fields(cls)
        if field.name != "api_key"
    }
    assert {(section, key) for section, key, _, _ in ENV_OVERRIDES} == keys


@pytest.mark.parametrize(
    ("section", "key", "raw", "expected"),
    ENV_OVERRIDES,
    ids=[f"CHORUS_{s.upper()}_{k.upper()}" for s, k, _, _ in ENV_OVERRIDES],
)
def test_environment_overrides_the_file(
    clean_env: pytest.MonkeyPatch, section: str, key: str, raw: str, expected: object
) -> None:
    clean_env.setenv(f"CHORUS_{section.upper()}_{key.upper()}", raw)
    settings = build_settings(parse_args([]))
    value = getattr(getattr(settings, section), key)
    assert value == expected
    assert type(value) is type(expected)
    # Nothing else moved.
    changed = dataclasses.asdict(settings)
    changed[section][key] = DOCUMENTED[section][key]  # type: ignore[index]
    changed["use_mock"] = True
    assert changed == DOCUMENTED


def test_cli_flags_override_environment_and_file(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "chorus.toml"
    config.write_text(
        '[server]\nhost = "127.0.0.2"\nport = 7000\n'
        '[upstream]\nbase_url = "http://file.invalid/v1"\nmodel = "file-model"\n'
    )
    clean_env.setenv("CHORUS_SERVER_HOST", "127.0.0.3")
    clean_env.setenv("CHORUS_SERVER_PORT", "7001")
    clean_env.setenv("CHORUS_UPSTREAM_BASE_URL", "http://env.invalid/v1")
    clean_env.setenv("CHORUS_UPSTREAM_MODEL", "env-model")

    settings = build_settings(parse_args(["--config", str(config)]))
    assert (settings.server.host, settings.server.port) == ("127.0.0.3", 7001)
    assert (settings.upstream.base_url, settings.upstream.model) == (
        "http://env.invalid/v1", "env-model",
    )
    assert settings.use_mock is False

    settings = build_settings(
        parse_args([
            "--config", str(config), "--host", "127.0.0.4", "--port", "7002",
            "--upstream-base-url", "http://cli.invalid/v1", "--model", "cli-model", "--mock",
        ])
    )
    assert (settings.server.host, settings.server.port) == ("127.0.0.4", 7002)
    assert (settings.upstream.base_url, settings.upstream.model) == (
        "http://cli.invalid/v1", "cli-model",
    )
    assert settings.use_mock is True

    clean_env.delenv("CHORUS_SERVER_PORT")
    assert build_settings(parse_args(["--config", str(config)])).server.port == 7000


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--port", "abc"], {}, "server.port"),
        (["--port", "65536"], {}, "server.port"),
        (["--upstream-base-url", "ftp://x"], {}, "upstream.base_url"),
        ([], {"CHORUS_UPSTREAM_IDLE_TIMEOUT": "abc"}, "upstream.idle_timeout"),
        ([], {"CHORUS_UPSTREAM_IDLE_TIMEOUT": "nan"}, "upstream.idle_timeout"),
        ([], {"CHORUS_UPSTREAM_IDLE_TIMEOUT": "0"}, "upstream.idle_timeout"),
        ([], {"CHORUS_HUB_BUFFER_EVENTS": "0"}, "hub.buffer_events"),
        ([], {"CHORUS_HUB_BUFFER_EVENTS": "1.5"}, "hub.buffer_events"),
        ([], {"CHORUS_HUB_RETENTION_SECONDS": "-1"}, "hub.retention_seconds"),
        ([], {"CHORUS_SERVER_LOG_LEVEL": "loud"}, "server.log_level"),
        ([], {"CHORUS_SERVER_EVENT_LOOP": "trio"}, "server.event_loop"),
        ([], {"CHORUS_SERVER_LOG_FORMAT": "xml"}, "server.log_format"),
        ([], {"CHORUS_HUB_ON_NO_SUBSCRIBERS": "pause"}, "hub.on_no_subscribers"),
        ([], {"CHORUS_UPSTREAM_MODEL": " "}, "upstream.model"),
        ([], {"CHORUS_MOCK_ANSWER_REPEAT": "0"}, "mock.answer_repeat"),
    ],
)
def test_bad_values_from_env_or_cli_name_key_and_source(
    clean_env: pytest.MonkeyPatch, argv: list[str], env: dict[str, str], needle: str
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        build_settings(parse_args(argv))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"config error: {needle} must ")
    assert message.endswith(f"(from {next(iter(env))})" if env else "(from command line)")


# --- the API key and mock mode ------------------------------------------------------------


def test_api_key_only_from_openai_api_key(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CHORUS_UPSTREAM_API_KEY", "sk-from-chorus-var")
    settings = build_settings(parse_args([]))
    assert settings.upstream.api_key is None
    assert settings.use_mock is True

    clean_env.setenv(API_KEY_ENV, "sk-the-real-one-1234")
    settings = build_settings(parse_args([]))
    assert settings.upstream.api_key == "sk-the-real-one-1234"
    assert "sk-the-real-one-1234" not in repr(settings)


def test_api_key_in_a_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "chorus.toml"
    config.write_text('[upstream]\napi_key = "sk-in-a-file"\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(config_path=config, environ={API_KEY_ENV: "sk-env"})
    assert str(raised.value) == (
        f"config error: unknown key upstream.api_key in {config} "
        "(the API key comes from OPENAI_API_KEY only)"
    )
    assert "sk-in-a-file" not in str(raised.value)


@pytest.mark.parametrize(
    ("env", "argv", "use_mock"),
    [
        ({}, [], True),
        ({API_KEY_ENV: ""}, [], True),
        ({API_KEY_ENV: "sk-x"}, [], False),
        ({"CHORUS_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1"}, [], False),
        ({"CHORUS_UPSTREAM_BASE_URL": DEFAULT_UPSTREAM_BASE_URL}, [], True),
        ({}, ["--upstream-base-url", "http://127.0.0.1:9/v1"], False),
        ({API_KEY_ENV: "sk-x", "CHORUS_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1"}, [], False),
        ({API_KEY_ENV: "sk-x"}, ["--mock"], True),
        ({}, ["--upstream-base-url", "http://127.0.0.1:9/v1", "--mock"], True),
    ],
)
def test_mock_mode(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], argv: list[str], use_mock: bool
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert build_settings(parse_args(argv)).use_mock is use_mock


# --- python -m server refuses bad configuration ---------------------------------------------


def run_server(
    args: list[str], *, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=cwd,
        env=child_env(**(env or {}), PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[upstream]\nidle_timeout = "abc"\n', "upstream.idle_timeout"),
        ("[hub]\nbuffer_events = 0\n", "hub.buffer_events"),
        ("[server]\nport = 70000\n", "server.port"),
        ("[server]\nport = 80.5\n", "server.port"),
        ("[server]\nprot = 8000\n", "server.prot"),
        ('[upstream]\napi_key = "sk-do-not-echo"\n', "upstream.api_key"),
        ("[serverr]\nport = 8000\n", "[serverr]"),
        ("[server]\nport = \n", "invalid TOML"),
        ('[server]\nhost = "\xff"\n', "invalid TOML"),
    ],
    ids=["idle_timeout", "buffer_events", "port-range", "port-float", "unknown-key", "api_key",
         "unknown-section", "bad-toml", "bad-utf8"],
)
def test_bad_config_file_stops_start_up_with_one_line(
    tmp_path: Path, toml: str, needle: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_bytes(toml.encode("latin-1"))
    result, elapsed = run_server(["--config", str(config), "--port", "0"])
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("config error: ")
    assert needle in lines[0]
    assert "sk-do-not-echo" not in result.stderr
    assert elapsed < 10


def test_bad_config_path_stops_start_up_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    result, _ = run_server(["--config", str(missing)])
    assert result.returncode == 2
    assert result.stderr == f"config error: file not found: {missing}\n"
    result, _ = run_server(["--config", str(tmp_path)])
    assert result.returncode == 2
    assert result.stderr == f"config error: cannot read {tmp_path}: Is a directory\n"


def test_bad_environment_value_stops_start_up_with_one_line() -> None:
    result, _ = run_server([], env={"CHORUS_HUB_BUFFER_EVENTS": "0"})
    assert result.returncode == 2
    assert result.stderr == (
        "config error: hub.buffer_events must be > 0, got 0 (from CHORUS_HUB_BUFFER_EVENTS)\n"
    )


def test_address_in_use_stops_start_up_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result, elapsed = run_server(["--port", str(port)])
    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: ") and "address already in use" in last, result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 10


# --- python -m server, for real -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def read_events(response: aiohttp.ClientResponse, until: str) -> list[tuple[str, Any]]:
    decoder = SSEDecoder()
    events: list[tuple[str, Any]] = []
    async with asyncio.timeout(10):
        while not events or events[-1][0] != until:
            data = await response.content.readany()
            assert data, f"stream closed before {until}: {events}"
            events += [(e.event, orjson.loads(e.data)) for e in decoder.feed(data)]
    return events


async def test_python_m_server_serves_the_mock(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--port", str(port)],
            cwd=REPO_ROOT,
            env=child_env(CHORUS_MOCK_CHUNKS_PER_SECOND="0", PYTHONPATH=str(REPO_ROOT)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_until_serving(f"{base}/healthz", alive=lambda: process.poll() is None)
        async with aiohttp.ClientSession() as session:

            async with session.get(f"{base}/v1/info") as response:
                info = await response.json()
            assert info["upstream"] == {"mock": True, "model": "gpt-4o-mini"}

            body = {"messages": [{"role": "user", "content": "What is SSE?"}]}
            async with session.post(f"{base}/v1/conversations", json=body) as response:
                assert response.status == 201
                created = await response.json()
            async with session.get(base + created["events_url"]) as stream:
                events = await read_events(stream, "done")
                answer = "".join(p["content"] for kind, p in events if kind == "answer")
                assert answer.strip()
                assert [kind for kind, _ in events][0] == "turn"

                # This subscriber is still attached when the server is told to stop.
                process.send_signal(signal.SIGTERM)
                ending = await read_events(stream, "end")
                assert ending[-1] == ("end", {"reason": "shutdown"})
        returncode = await asyncio.to_thread(process.wait, 15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    output = log_path.read_text()
    assert returncode == 0, output
    assert f"Chorus listening on http://127.0.0.1:{port}/" in output
    assert "upstream: embedded MOCK at http://127.0.0.1:" in output
    assert "Traceback" not in output
