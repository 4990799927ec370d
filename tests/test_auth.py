"""Access control over real sockets: API keys, watch tokens (query, cookie, expiry mid-stream),
CORS, the page's CSP, and no secret in any answer or log line."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import re
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse, web

from server.app import create_app
from server.app_keys import SETTINGS
from server.auth import (
    PAGE_CSP,
    RedactingAccessLogger,
    caller_identity,
    setup_access_control,
)
from server.config import AuthSettings, ConfigError, Settings
from server.credentials import (
    ApiKeys,
    WatchTokens,
    key_identity,
    load_api_keys,
    load_token_secret,
    parse_key_lines,
)
from server.errors import Forbidden

from .conftest import Chorus, StartChorus, eventually, make_settings, payloads
from .fake_upstream import FakeUpstream, Respond, Script, WaitFor, answer_script

UPSTREAM_KEY = "sk-test-SECRET-key-0123456789"  # tests/conftest.py make_settings
KEY_A = "chorus-key-ALPHA-0123456789abcdef"
KEY_B = "chorus-key-BETA-fedcba9876543210"
WRONG_KEY = "chorus-key-WRONG-0000000000000000"
TOKEN_SECRET = "token-secret-for-tests-0123456789-abcdefghijklmnop"
HELLO = [{"role": "user", "content": "hello"}]
UNKNOWN_ID = "AAAAAAAAAAAAAAAAAAAAAAAA"
ALLOWED_ORIGIN = "https://app.example.test"
OTHER_ORIGIN = "https://evil.example.test"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def expect_error(response: ClientResponse, status: int, code: str) -> dict[str, Any]:
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json", text
    body = orjson.loads(text)
    assert list(body) == ["error"] and body["error"]["code"] == code, body
    error: dict[str, Any] = body["error"]
    return error


async def create(chorus: Chorus, *, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """POST a conversation; forget the watch cookie the client's jar just took, so each test
    says exactly which credentials it sends."""
    response = await chorus.client.post(
        "/v1/conversations", json={"messages": HELLO}, headers=headers
    )
    assert response.status == 201, await response.text()
    chorus.client.session.cookie_jar.clear()
    body: dict[str, Any] = await response.json()
    return body


async def wait_finished(chorus: Chorus, conversation_id: str) -> None:
    conversation = chorus.registry.get(conversation_id)
    await eventually(lambda: not conversation.streaming)


# --- credentials, no HTTP -------------------------------------------------------------------


def test_every_configured_key_is_accepted_and_nothing_else() -> None:
    keys = ApiKeys([KEY_A, KEY_B, "k3"])
    assert keys.enabled and len(keys) == 3
    for key in (KEY_A, KEY_B, "k3"):
        assert keys.identify(key) == key_identity(hashlib.sha256(key.encode()).digest())
    for wrong in ("", WRONG_KEY, KEY_A[:-1], KEY_A + "x", KEY_A.upper(), " " + KEY_A, "k"):
        assert keys.identify(wrong) is None
    assert not ApiKeys([]).enabled


def test_identity_is_a_short_hash_never_the_key() -> None:
    identity = ApiKeys([KEY_A]).identify(KEY_A)
    assert identity == "key:" + hashlib.sha256(KEY_A.encode()).hexdigest()[:16]
    assert KEY_A not in identity


def test_the_key_check_compares_in_constant_time_against_every_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One `hmac.compare_digest` per configured key, of equal-length digests, whichever key
    matches and whether one does: no early exit, no length leak."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr("server.credentials.hmac.compare_digest", counting)
    configured = [KEY_A, KEY_B, "short", "a-much-longer-key-" * 8]
    keys = ApiKeys(configured)
    for presented in [*configured, WRONG_KEY, "x", ""]:
        calls.clear()
        keys.identify(presented)
        assert calls == [(32, 32)] * len(configured), presented


def test_key_file_lines_ignore_comments_and_blanks() -> None:
    text = "# production keys\n\n  key-one  \r\n#key-disabled\nkey-two\n   \n"
    assert parse_key_lines(text) == ["key-one", "key-two"]


def test_keys_come_from_the_environment_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# comment\n{KEY_B}\n")
    keys = load_api_keys(
        AuthSettings(api_keys_file=str(path)), {"CHORUS_API_KEYS": f" {KEY_A} ,, "}
    )
    assert len(keys) == 2
    assert keys.identify(KEY_A) and keys.identify(KEY_B)
    assert not load_api_keys(AuthSettings(), {}).enabled


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "config error: auth.api_keys_file: cannot read {path}: No such file or directory"),
        ("# only a comment\n\n", "config error: auth.api_keys_file: {path} holds no key"),
        (b"\xff\xfe", "config error: auth.api_keys_file: {path} is not UTF-8"),
    ],
)
def test_a_bad_keys_file_is_a_one_line_config_error(
    tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / "keys"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_api_keys(AuthSettings(api_keys_file=str(path)), {})
    assert str(caught.value) == message.format(path=path)


def test_a_short_token_secret_is_a_config_error() -> None:
    assert load_token_secret({}) is None
    assert load_token_secret({"CHORUS_TOKEN_SECRET": TOKEN_SECRET}) == TOKEN_SECRET.encode()
    with pytest.raises(ConfigError, match="CHORUS_TOKEN_SECRET must be at least 32 bytes, got 5"):
        load_token_secret({"CHORUS_TOKEN_SECRET": "short"})
    with pytest.raises(ValueError):
        WatchTokens(b"x" * 31, ttl_seconds=60)


def test_watch_tokens_are_scoped_signed_and_expire() -> None:
    now = [1_800_000_000.0]
    tokens = WatchTokens(TOKEN_SECRET.encode(), ttl_seconds=60, clock=lambda: now[0])
    token = tokens.issue("conv-1")
    assert token.expires_at == 1_800_000_060.0
    assert re.fullmatch(r"1800000060000\.[A-Za-z0-9_-]{43}", token.value)
    assert tokens.verify(token.value, "conv-1") == token.expires_at

    expiry, _, mac = token.value.partition(".")
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    refused = [
        ("conv-2", token.value),  # another conversation
        ("conv-1", f"{expiry}.{flipped}"),  # tampered MAC
        ("conv-1", f"{int(expiry) + 1000}.{mac}"),  # extended expiry
        ("conv-1", ""),
        ("conv-1", "garbage"),
        ("conv-1", f"{expiry}."),
        ("conv-1", f".{mac}"),
        ("conv-1", f"-1.{mac}"),
        ("conv-1", f"{expiry}.{mac}.x"),
        ("conv-1", f"{expiry}.{mac}é"),
        ("conv-1", f"{'9' * 200}.{mac}"),
        ("conv-1", WatchTokens(b"another-secret-" * 3, ttl_seconds=60).issue("conv-1").value),
    ]
    for conversation_id, value in refused:
        with pytest.raises(Forbidden) as caught:
            tokens.verify(value, conversation_id)
        assert caught.value.code == "forbidden", value

    now[0] += 60
    with pytest.raises(Forbidden) as caught:
        tokens.verify(token.value, "conv-1")
    assert caught.value.code == "token_expired"
    # Only a genuine token is told it expired; a forged old one is just refused.
    with pytest.raises(Forbidden) as caught:
        tokens.verify(f"{expiry}.{flipped}", "conv-1")
    assert caught.value.code == "forbidden"


# --- API keys over HTTP ---------------------------------------------------------------------


@pytest.fixture(params=["env", "file"])
async def keyed_chorus(
    request: pytest.FixtureRequest,
    start_chorus: StartChorus,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Chorus:
    """Chorus with KEY_A and KEY_B configured, from CHORUS_API_KEYS or from a keys file."""
    if request.param == "env":
        monkeypatch.setenv("CHORUS_API_KEYS", f"{KEY_A},{KEY_B}")
        return await start_chorus()
    path = tmp_path / "keys"
    path.write_text(f"# test keys\n{KEY_A}\n\n{KEY_B}\n")
    return await start_chorus(auth={"api_keys_file": str(path)})


# (method, path, body, status with a valid key) for every route that needs a key.
PROTECTED = [
    ("POST", "/v1/conversations", {"messages": HELLO}, 201),
    ("GET", "/v1/conversations", None, 200),
    ("POST", "/v1/conversations/{id}/messages", {"content": "more"}, 202),
    ("POST", "/v1/conversations/{id}/cancel", None, 409),  # not_streaming: the key was accepted
    ("DELETE", "/v1/conversations/{id}", None, 204),
]


@pytest.mark.parametrize("method, path, body, ok_status", PROTECTED)
async def test_protected_routes_need_a_valid_key(
    keyed_chorus: Chorus,
    fake_upstream: FakeUpstream,
    method: str,
    path: str,
    body: Any,
    ok_status: int,
) -> None:
    chorus = keyed_chorus
    fake_upstream.enqueue(answer_script(["a"]), answer_script(["b"]))
    created = await create(chorus, headers=bearer(KEY_A))
    await wait_finished(chorus, created["id"])
    url = path.format(id=created["id"])
    refusals = [
        {},
        bearer(WRONG_KEY),
        bearer(""),
        {"Authorization": KEY_A},  # no scheme
        {"Authorization": f"Basic {KEY_A}"},
        {"X-API-Key": WRONG_KEY},
    ]
    messages = set()
    for headers in refusals:
        response = await chorus.client.request(method, url, json=body, headers=headers)
        error = await expect_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer"
        messages.add(error["message"])
    assert len(messages) == 1  # missing and wrong are not told apart
    assert fake_upstream.calls == 1 and len(chorus.registry) == 1

    response = await chorus.client.request(method, url, json=body, headers=bearer(KEY_B))
    assert response.status == ok_status, await response.text()


async def test_x_api_key_and_any_configured_key_work(keyed_chorus: Chorus) -> None:
    response = await keyed_chorus.client.get("/v1/conversations", headers={"X-API-Key": KEY_B})
    assert response.status == 200
    response = await keyed_chorus.client.get(
        "/v1/conversations", headers={"Authorization": f"bearer  {KEY_A} "}
    )
    assert response.status == 200


async def test_the_key_is_checked_before_the_body_is_read(
    start_chorus: StartChorus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHORUS_API_KEYS", KEY_A)
    chorus = await start_chorus(server={"max_body_bytes": 64})
    for data in (b"{" * 1000, b"not json", b""):
        response = await chorus.client.post("/v1/conversations", data=data)
        await expect_error(response, 401, "unauthorized")
    response = await chorus.client.post(
        "/v1/conversations", data=b"{" * 1000, headers=bearer(KEY_A)
    )
    await expect_error(response, 413, "body_too_large")


async def test_open_routes_stay_open_with_keys(
    keyed_chorus: Chorus, fake_upstream: FakeUpstream
) -> None:
    chorus = keyed_chorus
    fake_upstream.enqueue(answer_script(["a"]))
    created = await create(chorus, headers=bearer(KEY_A))
    for path in ("/healthz", "/v1/info", "/", "/web/app.js", f"/v1/conversations/{created['id']}"):
        response = await chorus.client.get(path)
        assert response.status == 200, path
    stream = await chorus.subscribe(created["id"])
    assert stream.status == 200
    await stream.until_turn_ends()
    stream.close()


async def test_without_keys_the_api_is_open_and_says_so_once(
    start_chorus: StartChorus, fake_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.auth")
    fake_upstream.enqueue(answer_script(["a"]))
    chorus = await start_chorus()
    created = await create(chorus)
    response = await chorus.client.get("/v1/conversations")
    assert response.status == 200
    response = await chorus.client.delete(f"/v1/conversations/{created['id']}")
    assert response.status == 204
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    expected = (
        "auth: no API keys configured (CHORUS_API_KEYS or auth.api_keys_file): the API is "
        "unauthenticated, anyone who can reach it can start, list and delete conversations"
    )
    assert [r.getMessage() for r in warnings if "unauthenticated" in r.getMessage()] == [expected]


async def test_mock_mode_does_not_warn_about_an_open_api(
    aiohttp_server: Any, fake_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.auth")
    settings = dataclasses.replace(make_settings(fake_upstream.url), use_mock=True)
    await aiohttp_server(create_app(settings))
    assert "unauthenticated" not in caplog.text


async def test_an_unreadable_keys_file_stops_start_up(
    start_chorus: StartChorus, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-file"
    with pytest.raises(ConfigError) as caught:
        await start_chorus(auth={"api_keys_file": str(missing)})
    assert str(caught.value) == (
        f"config error: auth.api_keys_file: cannot read {missing}: No such file or directory"
    )


async def test_caller_identity_is_the_key_hash_or_the_address(
    aiohttp_client: Any, fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def who(request: web.Request) -> web.Response:
        return web.json_response({"who": caller_identity(request)})

    async def identities(*, keys: str | None) -> list[str]:
        if keys is None:
            monkeypatch.delenv("CHORUS_API_KEYS", raising=False)
        else:
            monkeypatch.setenv("CHORUS_API_KEYS", keys)
        app = web.Application()
        app[SETTINGS] = make_settings(fake_upstream.url)
        setup_access_control(app)
        app.router.add_get("/who", who)
        client = await aiohttp_client(app)
        found = []
        for headers in ({}, bearer(KEY_A), {"X-API-Key": KEY_B}, bearer(WRONG_KEY)):
            response = await client.get("/who", headers=headers)
            found.append((await response.json())["who"])
        return found

    key_a = "key:" + hashlib.sha256(KEY_A.encode()).hexdigest()[:16]
    key_b = "key:" + hashlib.sha256(KEY_B.encode()).hexdigest()[:16]
    assert await identities(keys=f"{KEY_A},{KEY_B}") == [
        "addr:127.0.0.1", key_a, key_b, "addr:127.0.0.1"
    ]
    # Keys off: a key someone sends buys no identity of its own (no dodging a rate limit).
    assert await identities(keys=None) == ["addr:127.0.0.1"] * 4


# --- watch tokens over HTTP -----------------------------------------------------------------


@pytest.fixture
async def guarded(start_chorus: StartChorus, monkeypatch: pytest.MonkeyPatch) -> Chorus:
    """Chorus requiring watch tokens, with a known token secret (to mint expired tokens)."""
    monkeypatch.setenv("CHORUS_TOKEN_SECRET", TOKEN_SECRET)
    return await start_chorus(auth={"require_watch_token": True})


def gated(gate: asyncio.Event) -> Script:
    script = answer_script(["first ", "second"])
    script.steps.insert(2, WaitFor(gate))
    return script


async def test_creation_returns_the_token_and_sets_the_cookie(
    guarded: Chorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["a"]))
    before = time.time()
    response = await guarded.client.post("/v1/conversations", json={"messages": HELLO})
    assert response.status == 201
    body = await response.json()
    conversation_id, token = body["id"], body["watch_token"]
    assert body["events_url"] == f"/v1/conversations/{conversation_id}/events?token={token}"
    assert before + 3600 <= body["watch_token_expires_at"] <= time.time() + 3600 + 0.001
    cookie = response.headers["Set-Cookie"]
    attributes = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")}
    assert cookie.startswith(f"chorus_watch_{conversation_id}={token};")
    assert attributes["path"] == f"Path=/v1/conversations/{conversation_id}"
    assert attributes["max-age"] == "Max-Age=3600"
    assert attributes["samesite"] == "SameSite=Strict"
    assert "httponly" in attributes
    assert "secure" not in attributes  # plain http here; set when the request came over TLS


async def test_without_require_watch_token_the_id_is_enough(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["a"]))
    chorus = await start_chorus()
    created = await create(chorus)
    assert created["events_url"] == f"/v1/conversations/{created['id']}/events"
    assert created["watch_token"]  # issued anyway, for clients that keep it
    stream = await chorus.subscribe(created["id"])
    assert stream.status == 200
    await stream.until_turn_ends()
    stream.close()


async def test_missing_wrong_and_garbled_tokens_are_forbidden(
    guarded: Chorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["a"]), answer_script(["b"]))
    first = await create(guarded)
    second = await create(guarded)
    first_id = first["id"]
    cases = [
        ("", {}),
        ("?token=", {}),
        (f"?token={second['watch_token']}", {}),  # another conversation's
        ("?token=garbage", {}),
        (f"?token={first['watch_token']}x", {}),
        (f"?token={first['watch_token'][:-1]}", {}),
        ("", {"Cookie": f"chorus_watch_{first_id}=garbage"}),
        # The other conversation's cookie, under either name.
        ("", {"Cookie": f"chorus_watch_{second['id']}={second['watch_token']}"}),
        ("", {"Cookie": f"chorus_watch_{first_id}={second['watch_token']}"}),
    ]
    for query, headers in cases:
        for suffix in ("/events", ""):
            response = await guarded.client.get(
                f"/v1/conversations/{first_id}{suffix}{query}", headers=headers
            )
            await expect_error(response, 403, "forbidden")
    # An unknown id without a token is refused the same way: existence is not revealed.
    response = await guarded.client.get(f"/v1/conversations/{UNKNOWN_ID}/events")
    await expect_error(response, 403, "forbidden")
    assert guarded.registry.get(first_id).log.subscriber_count == 0


async def test_an_expired_token_is_refused_as_expired(
    guarded: Chorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["a"]))
    created = await create(guarded)
    # A genuine token (same secret) whose hour ended a minute ago.
    old = WatchTokens(TOKEN_SECRET.encode(), ttl_seconds=3600, clock=lambda: time.time() - 3660)
    expired = old.issue(created["id"]).value
    for suffix in ("/events", ""):
        response = await guarded.client.get(
            f"/v1/conversations/{created['id']}{suffix}?token={expired}"
        )
        await expect_error(response, 403, "token_expired")
        response = await guarded.client.get(
            f"/v1/conversations/{created['id']}{suffix}",
            headers={"Cookie": f"chorus_watch_{created['id']}={expired}"},
        )
        await expect_error(response, 403, "token_expired")


async def test_query_token_and_cookie_both_let_a_viewer_watch(
    guarded: Chorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["hello ", "world"]))
    created = await create(guarded)
    conversation_id, token = created["id"], created["watch_token"]

    by_query = await guarded.client.get(created["events_url"])
    assert by_query.status == 200
    cookie = {"Cookie": f"chorus_watch_{conversation_id}={token}"}
    by_cookie = await guarded.subscribe(conversation_id, headers=cookie)
    assert by_cookie.status == 200
    await by_cookie.until_turn_ends()
    by_cookie.close()
    by_query.close()

    for headers, query in ((cookie, ""), ({}, f"?token={token}")):
        response = await guarded.client.get(
            f"/v1/conversations/{conversation_id}{query}", headers=headers
        )
        assert response.status == 200
        assert (await response.json())["id"] == conversation_id
    # A genuine token for a conversation that is gone: now it is a plain 404.
    ghost = WatchTokens(TOKEN_SECRET.encode(), ttl_seconds=60).issue(UNKNOWN_ID).value
    response = await guarded.client.get(f"/v1/conversations/{UNKNOWN_ID}/events?token={ghost}")
    await expect_error(response, 404, "conversation_not_found")


async def test_the_cookie_from_creation_works_like_a_browser(
    guarded: Chorus, fake_upstream: FakeUpstream
) -> None:
    """The client's cookie jar keeps the cookie and sends it back on the conversation's
    own paths, as a browser tab would for a same-origin EventSource."""
    fake_upstream.enqueue(answer_script(["a"]))
    response = await guarded.client.post("/v1/conversations", json={"messages": HELLO})
    conversation_id = (await response.json())["id"]
    stream = await guarded.subscribe(conversation_id)
    assert stream.status == 200
    await stream.until_turn_ends()
    stream.close()


async def test_a_token_expiring_mid_stream_ends_that_stream(
    start_chorus: StartChorus, fake_upstream: FakeUpstream
) -> None:
    gate = asyncio.Event()
    fake_upstream.enqueue(gated(gate))
    chorus = await start_chorus(
        auth={"require_watch_token": True, "watch_token_ttl_seconds": 0.5}
    )
    created = await create(chorus)
    log = chorus.registry.get(created["id"]).log
    stream = await chorus.subscribe(created["id"], query=f"?token={created['watch_token']}")
    assert stream.status == 200

    events = await stream.until(lambda e: e.event == "end")
    assert payloads(events, "end") == [{"reason": "token_expired"}]
    # No `id:` line: the `end` concerns this one subscriber, not the conversation.
    assert stream.raw.endswith(b'\n\nevent: end\ndata: {"reason":"token_expired"}\n\n')
    await stream.until_closed()
    assert time.time() >= created["watch_token_expires_at"]
    await eventually(lambda: log.subscriber_count == 0)
    # The conversation itself goes on.
    assert not log.closed and chorus.registry.get(created["id"]).streaming
    gate.set()
    await wait_finished(chorus, created["id"])


# --- CORS -----------------------------------------------------------------------------------


@pytest.fixture
async def cors_chorus(start_chorus: StartChorus) -> Chorus:
    return await start_chorus(auth={"cors_origins": (ALLOWED_ORIGIN + "/", "http://other.test")})


async def test_an_allowed_origin_gets_cors_headers(
    cors_chorus: Chorus, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(answer_script(["a"]))
    response = await cors_chorus.client.post(
        "/v1/conversations", json={"messages": HELLO}, headers={"Origin": ALLOWED_ORIGIN}
    )
    assert response.status == 201
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Origin" in response.headers.getall("Vary")
    conversation_id = (await response.json())["id"]
    stream = await cors_chorus.subscribe(conversation_id, headers={"Origin": ALLOWED_ORIGIN})
    assert stream.response.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    await stream.until_turn_ends()
    stream.close()
    response = await cors_chorus.client.get("/v1/nowhere", headers={"Origin": ALLOWED_ORIGIN})
    await expect_error(response, 404, "not_found")
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN


async def test_other_origins_get_no_cors_headers(cors_chorus: Chorus) -> None:
    for headers in ({"Origin": OTHER_ORIGIN}, {"Origin": "null"}, {}):
        response = await cors_chorus.client.get("/v1/conversations", headers=headers)
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Access-Control-Allow-Credentials" not in response.headers
        assert "Origin" in response.headers.getall("Vary")


async def test_preflight_from_an_allowed_origin(cors_chorus: Chorus) -> None:
    for path in ("/v1/conversations", "/v1/conversations/abc/events"):
        response = await cors_chorus.client.options(
            path,
            headers={
                "Origin": ALLOWED_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert response.status == 204
        headers = response.headers
        assert headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
        assert headers["Access-Control-Allow-Credentials"] == "true"
        assert headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE"
        assert set(headers["Access-Control-Allow-Headers"].split(", ")) >= {
            "Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"
        }
        assert headers["Access-Control-Max-Age"] == "600"


async def test_preflight_from_another_origin_is_refused(
    cors_chorus: Chorus, start_chorus: StartChorus
) -> None:
    no_cors = await start_chorus()
    for chorus in (cors_chorus, no_cors):
        response = await chorus.client.options(
            "/v1/conversations",
            headers={"Origin": OTHER_ORIGIN, "Access-Control-Request-Method": "POST"},
        )
        await expect_error(response, 403, "forbidden")
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Access-Control-Allow-Methods" not in response.headers


async def test_options_that_is_not_a_preflight_is_answered_as_before(cors_chorus: Chorus) -> None:
    response = await cors_chorus.client.options("/v1/conversations")
    await expect_error(response, 405, "method_not_allowed")
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}
    response = await cors_chorus.client.options(
        "/", headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "GET"}
    )
    await expect_error(response, 405, "method_not_allowed")
    response = await cors_chorus.client.options("/nowhere")
    await expect_error(response, 404, "not_found")


# --- the page -------------------------------------------------------------------------------


async def test_the_page_is_served_with_a_strict_csp(start_chorus: StartChorus) -> None:
    chorus = await start_chorus()
    for path in ("/", "/web/app.js", "/web/style.css", "/web/index.html"):
        response = await chorus.client.get(path)
        assert response.status == 200, path
        assert response.headers["Content-Security-Policy"] == (
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        ) == PAGE_CSP
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
    response = await chorus.client.get("/v1/info")
    assert "Content-Security-Policy" not in response.headers


def test_the_page_has_no_inline_script_or_style() -> None:
    """What the CSP would block: inline <script>/<style>, style= and on*= attributes."""
    web_root = Path(__file__).resolve().parent.parent / "web"
    html = (web_root / "index.html").read_text()
    for match in re.finditer(r"<script\b[^>]*>", html):
        assert "src=" in match.group(0), match.group(0)
    assert "<style" not in html
    assert not re.search(r"\s(style|on[a-z]+)\s*=", html)
    script = (web_root / "app.js").read_text()
    assert "innerHTML" not in script and "eval(" not in script
    assert ".style." not in script and "setAttribute(\"style\"" not in script


# --- secrets --------------------------------------------------------------------------------


async def test_no_path_returns_or_logs_a_secret(
    start_chorus: StartChorus,
    fake_upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CHORUS_API_KEYS", f"{KEY_A},{KEY_B}")
    monkeypatch.setenv("CHORUS_TOKEN_SECRET", TOKEN_SECRET)
    fake_upstream.enqueue(
        answer_script(["a haiku ", "about keys"]),
        # An upstream that echoes the key back in its error: it must be scrubbed.
        Script([Respond(401, f"Incorrect API key provided: {UPSTREAM_KEY}".encode())]),
    )
    chorus = await start_chorus(
        auth={"require_watch_token": True, "cors_origins": (ALLOWED_ORIGIN,)}
    )
    client = chorus.client
    seen: list[str] = []

    async def fetch(method: str, path: str, **kwargs: Any) -> ClientResponse:
        response = await client.request(method, path, **kwargs)
        seen.append(f"{response.status} {dict(response.headers)!r} {await response.text()}")
        return response

    key = bearer(KEY_A)
    created = await fetch("POST", "/v1/conversations", json={"messages": HELLO}, headers=key)
    body = await created.json()
    conversation_id, token = body["id"], body["watch_token"]
    stream = await chorus.subscribe(conversation_id, query=f"?token={token}")
    await stream.until_turn_ends(0)
    await fetch(
        "POST", f"/v1/conversations/{conversation_id}/messages",
        json={"content": "again"}, headers=key,
    )
    await stream.until_turn_ends(1)
    for path in (f"/v1/conversations/{conversation_id}?token={token}", "/v1/info", "/healthz", "/"):
        await fetch("GET", path)
    await fetch("GET", "/v1/conversations", headers=key)
    await fetch("GET", "/v1/conversations", headers=bearer(WRONG_KEY))
    await fetch("POST", "/v1/conversations", json={"messages": HELLO})
    await fetch("GET", f"/v1/conversations/{conversation_id}/events?token=forged")
    await fetch(
        "OPTIONS", "/v1/conversations",
        headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    await fetch("POST", f"/v1/conversations/{conversation_id}/cancel", headers=key)
    await fetch("DELETE", f"/v1/conversations/{conversation_id}", headers=key)
    await stream.until_closed()
    seen.append(f"{stream.status} {dict(stream.response.headers)!r} {stream.raw.decode()}")

    # The test means something: the key went upstream, the turn failed on its echo, and
    # the stream and the logs are not empty.
    assert fake_upstream.headers[0]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert '"code":"upstream_error"' in seen[-1] and "Incorrect API key" in seen[-1]
    assert "conversation" in caplog.text and "401 unauthorized" in caplog.text
    everything = "\n".join(seen) + "\n" + caplog.text
    for secret in (UPSTREAM_KEY, KEY_A, KEY_B, WRONG_KEY, TOKEN_SECRET, "sk-test-SECRET"):
        assert secret not in everything, secret


async def test_the_access_log_redacts_watch_tokens(
    aiohttp_server: Any, aiohttp_client: Any, fake_upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    settings: Settings = make_settings(fake_upstream.url)
    server = await aiohttp_server(create_app(settings), access_log_class=RedactingAccessLogger)
    client = await aiohttp_client(server)
    await client.get(f"/v1/conversations/{UNKNOWN_ID}/events?after=0&token=SEEKRIT.abc&x=1")
    await client.get(f"/v1/conversations/{UNKNOWN_ID}?token=SEEKRIT2")
    # The combined stream takes one token per conversation, as ?tokens=.
    await client.get(f"/v1/events?conversations={UNKNOWN_ID}&tokens=SEEKRIT3.a,SEEKRIT4.b")
    await eventually(lambda: len([r for r in caplog.records if r.name == "aiohttp.access"]) >= 3)
    assert "SEEKRIT" not in caplog.text
    assert f"/v1/conversations/{UNKNOWN_ID}/events?after=0&token=REDACTED&x=1" in caplog.text
    assert f"/v1/conversations/{UNKNOWN_ID}?token=REDACTED " in caplog.text
    assert f"/v1/events?conversations={UNKNOWN_ID}&tokens=REDACTED " in caplog.text


async def test_a_stream_that_ends_first_cancels_its_expiry_timer(
    guarded: Chorus, fake_upstream: FakeUpstream
) -> None:
    """The timer handle set per stream goes when the stream goes (not an hour later)."""
    gate = asyncio.Event()
    fake_upstream.enqueue(gated(gate))
    created = await create(guarded)
    log = guarded.registry.get(created["id"]).log
    loop = asyncio.get_running_loop()

    def expiry_timers() -> list[asyncio.TimerHandle]:
        scheduled: list[asyncio.TimerHandle] = loop._scheduled  # type: ignore[attr-defined]
        return [
            handle for handle in scheduled
            if not handle.cancelled() and getattr(handle._callback, "__name__", "") == "end"
        ]

    stream = await guarded.subscribe(created["id"], query=f"?token={created['watch_token']}")
    await eventually(lambda: log.subscriber_count == 1)
    assert len(expiry_timers()) == 1
    stream.close()
    await eventually(lambda: log.subscriber_count == 0)
    assert expiry_timers() == []
    gate.set()
    await wait_finished(guarded, created["id"])
