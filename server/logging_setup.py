"""Logging for `python -m server`: the root handler, in the format `server.log_format` asks.

"text" is one human-readable line per record. "json" is one JSON object per line, for log
pipelines: `ts` (ISO 8601, UTC, milliseconds), `level`, `logger`, `message`, then
`conversation` when the record carries one (`logger.info(..., extra={"conversation":
id})`) and `exc_info` (the formatted traceback) when there is one. Nothing else from the
record is copied, so an `extra` never leaks into the output by accident.

Records are whatever the code logged: lines are written to carry no API key, token or
prompt text (see CONVENTIONS.md, rule 12); this module adds nothing from the environment.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any, TextIO

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (orjson escapes every newline)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        conversation = getattr(record, "conversation", None)
        if conversation is not None:
            entry["conversation"] = str(conversation)
        if record.exc_info:
            # Cached on the record, as logging.Formatter does, for other handlers.
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str, fmt: str, *, stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one writing to `stream` (stderr by
    default) in `fmt` ("text" or "json") at `level`. aiohttp's access log
    (`aiohttp.access`, one line per request) goes through it like every other logger."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
