"""Credentials: the API keys callers present and the watch tokens Chorus signs. No HTTP.

Owns where API keys come from (`CHORUS_API_KEYS` and `auth.api_keys_file`, never
config.toml), how a presented key is checked (constant time, against every key), the short
non-reversible identity a key is known by elsewhere (rate limits, logs), and the watch
tokens: HMAC-SHA256 over (conversation id, expiry), scoped to one conversation.

Nothing here ever logs or returns a key or a secret; `ApiKeys` does not even keep the keys,
only their SHA-256 digests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import AuthSettings, ConfigError
from .errors import Forbidden

logger = logging.getLogger(__name__)

API_KEYS_ENV = "CHORUS_API_KEYS"
TOKEN_SECRET_ENV = "CHORUS_TOKEN_SECRET"
MIN_TOKEN_SECRET_BYTES = 32
# Longer than any token we issue (13-digit expiry, dot, 43-character MAC) with room to spare;
# anything longer is refused before any work is done on it.
MAX_TOKEN_CHARS = 128
_TOKEN_CONTEXT = b"chorus-watch-v1"

Clock = Callable[[], float]


def key_identity(digest: bytes) -> str:
    """The name a key goes by outside this module: 16 hex digits of its SHA-256. An operator
    can compute it (`printf %s KEY | sha256sum | cut -c1-16`); nobody can reverse it."""
    return "key:" + digest.hex()[:16]


class ApiKeys:
    """The configured API keys, held as SHA-256 digests.

    A presented key is hashed and compared with `hmac.compare_digest` against every
    configured digest, with no early exit: the time taken depends on neither which key
    matched, nor how much of one did, nor the keys' lengths.
    """

    __slots__ = ("_digests",)

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(
            dict.fromkeys(hashlib.sha256(key.encode()).digest() for key in keys)
        )

    def __len__(self) -> int:
        return len(self._digests)

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured (else the API is open)."""
        return bool(self._digests)

    def identify(self, presented: str) -> str | None:
        """The identity of `presented` (see `key_identity`) when it is a configured key,
        else None."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        matched = False
        for configured in self._digests:
            matched |= hmac.compare_digest(configured, digest)
        return key_identity(digest) if matched else None


def parse_key_lines(text: str) -> list[str]:
    """The keys in an api_keys_file: one per line; blank lines and `#` lines are ignored."""
    keys = []
    for line in text.splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            keys.append(key)
    return keys


def load_api_keys(settings: AuthSettings, environ: Mapping[str, str]) -> ApiKeys:
    """Keys from `CHORUS_API_KEYS` (comma-separated) plus `auth.api_keys_file`.

    Raises ConfigError (one line) when the file cannot be read or holds no key: a file that
    was meant to lock the API must not leave it open by being empty.
    """
    keys = [key.strip() for key in environ.get(API_KEYS_ENV, "").split(",") if key.strip()]
    if settings.api_keys_file:
        path = Path(settings.api_keys_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"config error: auth.api_keys_file: cannot read {path}: {exc.strerror or exc}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"config error: auth.api_keys_file: {path} is not UTF-8") from None
        from_file = parse_key_lines(text)
        if not from_file:
            raise ConfigError(f"config error: auth.api_keys_file: {path} holds no key")
        keys.extend(from_file)
    return ApiKeys(keys)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchToken:
    """A signed token letting its holder watch one conversation until `expires_at`."""

    value: str
    # Unix time (seconds) after which the token is refused.
    expires_at: float


class WatchTokens:
    """Issues and checks watch tokens: `<expiry in unix ms>.<urlsafe base64 HMAC-SHA256>`,
    the MAC over the conversation id and the expiry, keyed by a server secret.

    A token for one conversation is refused for every other. The MAC is checked before the
    expiry, so only a genuine token is ever told it has expired.
    """

    __slots__ = ("_clock", "_secret", "_ttl")

    def __init__(self, secret: bytes, *, ttl_seconds: float, clock: Clock = time.time) -> None:
        if len(secret) < MIN_TOKEN_SECRET_BYTES:
            raise ValueError(f"a token secret needs at least {MIN_TOKEN_SECRET_BYTES} bytes")
        if ttl_seconds <= 0:
            raise ValueError("a watch token needs a ttl > 0")
        self._secret = secret
        self._ttl = ttl_seconds
        self._clock = clock

    @property
    def ttl_seconds(self) -> float:
        return self._ttl

    def _mac(self, conversation_id: str, expires_ms: int) -> str:
        message = b"%b\x00%b\x00%d" % (_TOKEN_CONTEXT, conversation_id.encode(), expires_ms)
        return _b64(hmac.new(self._secret, message, hashlib.sha256).digest())

    def seconds_left(self, expires_at: float) -> float:
        """How long until `expires_at` (a verified token's expiry), never negative."""
        return max(0.0, expires_at - self._clock())

    def issue(self, conversation_id: str) -> WatchToken:
        expires_ms = math.ceil((self._clock() + self._ttl) * 1000)
        value = f"{expires_ms}.{self._mac(conversation_id, expires_ms)}"
        return WatchToken(value=value, expires_at=expires_ms / 1000)

    def verify(self, token: str, conversation_id: str) -> float:
        """The token's expiry (unix seconds) when it is genuine, for this conversation and
        not expired. Raises Forbidden: `forbidden` when it is malformed, forged or for
        another conversation; `token_expired` when it is genuine but past its expiry."""
        expiry, dot, mac = token.partition(".")
        if (
            not dot
            or len(token) > MAX_TOKEN_CHARS
            or not token.isascii()
            or not expiry.isdigit()
            or len(expiry) > 15
        ):
            raise Forbidden("a valid watch token for this conversation is required")
        expires_ms = int(expiry)
        if not hmac.compare_digest(self._mac(conversation_id, expires_ms), mac):
            raise Forbidden("a valid watch token for this conversation is required")
        expires_at = expires_ms / 1000
        if self._clock() >= expires_at:
            raise Forbidden("the watch token has expired", code="token_expired")
        return expires_at


def load_token_secret(environ: Mapping[str, str]) -> bytes | None:
    """`CHORUS_TOKEN_SECRET` as bytes, or None when unset. Raises ConfigError when it is
    shorter than 32 bytes."""
    raw = environ.get(TOKEN_SECRET_ENV, "")
    if not raw:
        return None
    secret = raw.encode()
    if len(secret) < MIN_TOKEN_SECRET_BYTES:
        raise ConfigError(
            f"config error: {TOKEN_SECRET_ENV} must be at least {MIN_TOKEN_SECRET_BYTES} "
            f"bytes, got {len(secret)}"
        )
    return secret


def new_token_secret() -> bytes:
    return secrets.token_bytes(MIN_TOKEN_SECRET_BYTES)


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessControl:
    """Everything the HTTP layer needs to decide who may do what (see `server/auth.py`)."""

    keys: ApiKeys
    tokens: WatchTokens
    require_watch_token: bool
    # Exact origins (`scheme://host[:port]`, lower case, no trailing slash) allowed by CORS.
    cors_origins: frozenset[str]
    # False when the token secret was made up at start-up (tokens die with the process).
    persistent_secret: bool


def normalize_origin(origin: str) -> str:
    """An origin as browsers send it in `Origin`: lower case, no trailing slash."""
    return origin.strip().rstrip("/").lower()


def load_access_control(settings: AuthSettings, environ: Mapping[str, str]) -> AccessControl:
    """Build the access control from `[auth]` and the environment (keys, token secret).

    Raises ConfigError (one line) for an unreadable or empty keys file, a short token
    secret, or a CORS origin that is not `http(s)://host[:port]` (`*` is refused: the API
    answers with credentials, which a wildcard origin may not be given).
    """
    origins = set()
    for origin in settings.cors_origins:
        normal = normalize_origin(origin)
        scheme, sep, rest = normal.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
            raise ConfigError(
                f"config error: auth.cors_origins: {origin!r} is not an origin like "
                "'https://app.example.com' (no path, no wildcard)"
            )
        origins.add(normal)
    secret = load_token_secret(environ)
    return AccessControl(
        keys=load_api_keys(settings, environ),
        tokens=WatchTokens(
            secret if secret is not None else new_token_secret(),
            ttl_seconds=settings.watch_token_ttl_seconds,
        ),
        require_watch_token=settings.require_watch_token,
        cors_origins=frozenset(origins),
        persistent_secret=secret is not None,
    )
