"""`python -m server`: run Chorus.

    python -m server [--config PATH] [--host H] [--port P] [--upstream-base-url URL] [--mock]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from aiohttp import web

from .app import create_app
from .auth import RedactingAccessLogger
from .config import ConfigError, Settings, load_settings
from .logging_setup import configure_logging

DEFAULT_CONFIG = Path("config.toml")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Chorus: one LLM answer streamed to any number of viewers over SSE.",
    )
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config file (default: ./config.toml when present)")
    parser.add_argument("--host", help="address to listen on (server.host)")
    parser.add_argument("--port", help="port to listen on (server.port)")
    parser.add_argument("--upstream-base-url", help="OpenAI-compatible base URL (upstream.base_url)")
    parser.add_argument("--model", help="default model (upstream.model)")
    parser.add_argument("--mock", action="store_true",
                        help="use the embedded mock upstream even when a key or base_url is set")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    config_path = args.config
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    return load_settings(
        config_path=config_path,
        environ=os.environ,
        overrides={
            "server": {"host": args.host, "port": args.port},
            "upstream": {"base_url": args.upstream_base_url, "model": args.model},
        },
        force_mock=args.mock,
    )


def new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """The loop `server.event_loop` asks for: "uvloop", "asyncio", or "auto" (uvloop if
    installed). Raises ConfigError when uvloop is asked for and not installed."""
    if choice == "asyncio":
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "config error: server.event_loop is 'uvloop' but uvloop is not installed "
                "(pip install '.[speed]')"
            ) from None
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        settings = build_settings(args)
        loop = new_event_loop(settings.server.event_loop)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.server.log_level, settings.server.log_format)
    logging.getLogger(__name__).info(
        "Chorus listening on http://%s:%d/ (event loop: %s)",
        settings.server.host, settings.server.port, type(loop).__module__.split(".")[0],
    )
    try:
        web.run_app(
            create_app(settings),
            host=settings.server.host,
            port=settings.server.port,
            handler_cancellation=True,
            print=None,
            loop=loop,
            # Handlers still running after the graceful part are cancelled after this long.
            shutdown_timeout=settings.server.shutdown_grace_seconds + 5.0,
            # One line per request on `aiohttp.access`, with watch tokens redacted.
            access_log=logging.getLogger("aiohttp.access"),
            access_log_class=RedactingAccessLogger,
        )
    except ConfigError as error:
        # Found at start-up (the API keys file, the token secret): as above, one line.
        print(str(error), file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        # Typically the address is taken: one line, like a config error, not a traceback.
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
