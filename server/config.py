"""Configuration: `config.toml`, then `CHORUS_<SECTION>_<KEY>` environment overrides, then CLI.

Owns the typed settings objects and their validation. A bad value raises `ConfigError`
whose message is one line naming the key and where the value came from. The upstream
API key is read from the `OPENAI_API_KEY` environment variable only, never from a file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_UPSTREAM_BASE_URL = "https://api.openai.com/v1"
API_KEY_ENV = "OPENAI_API_KEY"


class ConfigError(Exception):
    """A configuration value is missing, malformed or out of range."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 1_048_576
    log_level: str = "INFO"
    # "text": one readable line per record; "json": one JSON object per line.
    log_format: str = "text"
    # "auto": uvloop when it is installed (pip install .[speed]), else asyncio's own loop.
    event_loop: str = "auto"
    # On SIGTERM/SIGINT: how long running turns may go on before they are cancelled.
    shutdown_grace_seconds: float = 10.0
    # A repeated Idempotency-Key within this window gets the first request's answer.
    idempotency_window_seconds: float = 600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamSettings:
    base_url: str = DEFAULT_UPSTREAM_BASE_URL
    model: str = "gpt-4o-mini"
    connect_timeout: float = 10.0
    first_chunk_timeout: float = 60.0
    idle_timeout: float = 60.0
    max_retries: int = 2
    retry_backoff_seconds: float = 0.5
    retry_backoff_max_seconds: float = 8.0
    retry_after_max_seconds: float = 30.0
    # Bound on a whole turn, retries included; 0 means none beyond the other timeouts.
    total_timeout: float = 600.0
    max_choices: int = 8
    # Never read from a file: filled from OPENAI_API_KEY by `load_settings`.
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class HubSettings:
    buffer_events: int = 4096
    buffer_bytes: int = 4_194_304
    retention_seconds: float = 600.0
    max_conversations: int = 1000
    heartbeat_seconds: float = 15.0
    retry_hint_ms: int = 2000
    # A subscriber whose pending writes have not drained in this many seconds is dropped.
    send_timeout: float = 30.0
    # When the last subscriber leaves a streaming turn: "keep" generating, or "cancel" it
    # after idle_grace_seconds with nobody watching.
    on_no_subscribers: str = "keep"
    idle_grace_seconds: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsSettings:
    """Each bound answers 429 (or 413/503) with a JSON error when reached; 0 = unlimited
    for the counts."""

    max_live_conversations: int = 256
    max_subscribers_per_conversation: int = 10_000
    max_subscribers_total: int = 20_000
    max_messages: int = 256
    starts_per_minute_per_key: int = 60


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSettings:
    """API keys come from CHORUS_API_KEYS (comma-separated) and/or `api_keys_file`, never
    from config.toml; none configured means the API is open."""

    api_keys_file: str = ""
    require_watch_token: bool = False
    watch_token_ttl_seconds: float = 3600.0
    cors_origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class MockSettingsSection:
    chunks_per_second: float = 40.0
    answer_repeat: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    hub: HubSettings = field(default_factory=HubSettings)
    mock: MockSettingsSection = field(default_factory=MockSettingsSection)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    # True when the embedded mock upstream answers instead of a real model.
    use_mock: bool = False


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "upstream": UpstreamSettings,
    "hub": HubSettings,
    "mock": MockSettingsSection,
    "limits": LimitsSettings,
    "auth": AuthSettings,
}
_SECRET_KEYS = {("upstream", "api_key")}
_POSITIVE = {
    ("server", "max_body_bytes"),
    ("upstream", "connect_timeout"),
    ("upstream", "first_chunk_timeout"),
    ("upstream", "idle_timeout"),
    ("upstream", "max_choices"),
    ("hub", "buffer_events"),
    ("hub", "buffer_bytes"),
    ("hub", "max_conversations"),
    ("hub", "heartbeat_seconds"),
    ("mock", "answer_repeat"),
    ("hub", "send_timeout"),
    ("server", "idempotency_window_seconds"),
    ("auth", "watch_token_ttl_seconds"),
}
_CHOICES = {
    ("server", "event_loop"): {"auto", "asyncio", "uvloop"},
    ("server", "log_format"): {"text", "json"},
    ("hub", "on_no_subscribers"): {"keep", "cancel"},
}
_KIND_NAMES = {tuple: "a list of strings"}
_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR"}


def _coerce(section: str, key: str, raw: object, kind: type[Any], source: str) -> object:
    """Convert `raw` to `kind` (from TOML or an environment string), or raise ConfigError."""
    name = f"{section}.{key}"
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError
        if kind is int:
            if isinstance(raw, bool) or isinstance(raw, float):
                raise ValueError
            return int(raw) if isinstance(raw, int) else int(str(raw).strip(), 10)
        if kind is tuple:
            # A TOML array of strings, or a comma-separated string (environment, flags).
            items = raw if isinstance(raw, list) else str(raw).split(",")
            if not all(isinstance(item, str) for item in items):
                raise ValueError
            return tuple(item.strip() for item in items if item.strip())
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw) if isinstance(raw, (int, float)) else float(str(raw).strip())
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError
            return value
        if not isinstance(raw, str):
            raise ValueError
        return raw
    except ValueError:
        raise ConfigError(
            f"config error: {name} must be {_KIND_NAMES.get(kind, kind.__name__)}, "
            f"got {raw!r} (from {source})"
        ) from None


def _field_types(cls: type[Any]) -> dict[str, type[Any]]:
    hints = {
        "int": int, "float": float, "str": str, "bool": bool, "str | None": str,
        "tuple[str, ...]": tuple,
    }
    return {f.name: hints[str(f.type)] for f in dataclasses.fields(cls)}


def _validate(section: str, key: str, value: object, source: str) -> None:
    name = f"{section}.{key}"
    if (section, key) in _POSITIVE and isinstance(value, (int, float)) and value <= 0:
        raise ConfigError(f"config error: {name} must be > 0, got {value!r} (from {source})")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"config error: {name} must be >= 0, got {value!r} (from {source})")
    if (section, key) == ("server", "port") and isinstance(value, int) and value > 65535:
        raise ConfigError(f"config error: {name} must be 0..65535, got {value!r} (from {source})")
    choices = _CHOICES.get((section, key))
    if choices is not None and value not in choices:
        raise ConfigError(
            f"config error: {name} must be one of {sorted(choices)}, got {value!r} "
            f"(from {source})"
        )
    if (section, key) == ("server", "log_level") and str(value).upper() not in _LOG_LEVELS:
        raise ConfigError(
            f"config error: {name} must be one of {sorted(_LOG_LEVELS)}, got {value!r} "
            f"(from {source})"
        )
    if (section, key) == ("upstream", "model") and not str(value).strip():
        # Requests that name no model get this one; empty, every such request would be refused.
        raise ConfigError(f"config error: {name} must not be empty (from {source})")
    if (section, key) == ("upstream", "base_url"):
        text = str(value)
        if not (text.startswith("http://") or text.startswith("https://")):
            raise ConfigError(
                f"config error: {name} must be an http:// or https:// URL, got {value!r} "
                f"(from {source})"
            )


def _read(section: str, key: str, raw: object, kind: type[Any], source: str) -> object:
    value = _coerce(section, key, raw, kind, source)
    _validate(section, key, value, source)
    return value


def load_settings(
    *,
    config_path: Path | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, Mapping[str, object]] | None = None,
    force_mock: bool = False,
) -> Settings:
    """Build Settings from the file, then the environment, then `overrides` (CLI flags).

    Raises ConfigError for an unknown section or key, a malformed value or a missing file.
    """
    file_values: dict[str, Any] = {}
    if config_path is not None:
        try:
            with config_path.open("rb") as handle:
                file_values = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config error: file not found: {config_path}") from None
        except OSError as exc:
            raise ConfigError(
                f"config error: cannot read {config_path}: {exc.strerror or exc}"
            ) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config error: {config_path}: invalid TOML: {exc}") from None

    for section in file_values:
        if section not in _SECTIONS:
            raise ConfigError(f"config error: unknown section [{section}] in {config_path}")

    sections: dict[str, object] = {}
    for section, cls in _SECTIONS.items():
        types = _field_types(cls)
        values: dict[str, object] = {}
        table = file_values.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"config error: [{section}] must be a table in {config_path}")
        for key, raw in table.items():
            if key not in types or (section, key) in _SECRET_KEYS:
                raise ConfigError(
                    f"config error: unknown key {section}.{key} in {config_path}"
                    + (" (the API key comes from OPENAI_API_KEY only)" if key == "api_key" else "")
                )
            values[key] = _read(section, key, raw, types[key], str(config_path))
        for key, kind in types.items():
            if (section, key) in _SECRET_KEYS:
                continue
            env_name = f"CHORUS_{section.upper()}_{key.upper()}"
            if env_name in environ:
                values[key] = _read(section, key, environ[env_name], kind, env_name)
        for key, raw in (overrides or {}).get(section, {}).items():
            if raw is not None:
                values[key] = _read(section, key, raw, types[key], "command line")
        if section == "upstream":
            api_key = environ.get(API_KEY_ENV) or None
            values["api_key"] = api_key
        sections[section] = cls(**values)

    upstream = sections["upstream"]
    assert isinstance(upstream, UpstreamSettings)
    use_mock = force_mock or (
        upstream.api_key is None and upstream.base_url == DEFAULT_UPSTREAM_BASE_URL
    )
    return Settings(
        server=sections["server"],  # type: ignore[arg-type]
        upstream=upstream,
        hub=sections["hub"],  # type: ignore[arg-type]
        mock=sections["mock"],  # type: ignore[arg-type]
        limits=sections["limits"],  # type: ignore[arg-type]
        auth=sections["auth"],  # type: ignore[arg-type]
        use_mock=use_mock,
    )
