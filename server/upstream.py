"""The upstream client: one streaming Chat Completions request, parsed chunk by chunk.

Owns the HTTP side of talking to an OpenAI-compatible server: the request, retries with
backoff before the first chunk, the connect / first-chunk / idle timeouts, and turning
every failure into an `UpstreamFailure` with a documented code. Knows nothing of the hub
or of subscribers: parsed chunks go to a callback.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from .chat_chunks import ChatChunk, describe_upstream_error, parse_chunk
from .config import UpstreamSettings
from .errors import TurnErrorCode, UpstreamFailure
from .sse import LineTooLong, SSEDecoder

logger = logging.getLogger(__name__)

_MAX_ERROR_BODY = 65_536
_SECRET_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{6,})")
# Shorter than this, the start of a key cut off at the end of a text is left alone.
_MIN_KEY_FRAGMENT = 4


class IdleTimeout(UpstreamFailure):
    """The stream went quiet for `idle_timeout` after its first chunk.

    Not necessarily a failure: when every choice already has its finish_reason, the turn
    is complete and only the usage chunk (or `[DONE]`) is missing.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(
            TurnErrorCode.UPSTREAM_TIMEOUT, f"upstream sent nothing for {seconds:g} s"
        )


class TotalTimeout(UpstreamFailure):
    """The whole turn, retries included, ran past `upstream.total_timeout`."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            TurnErrorCode.UPSTREAM_TIMEOUT,
            f"the answer took longer than upstream.total_timeout ({seconds:g} s)",
        )


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """How a stream that did not fail ended."""

    saw_done_marker: bool
    chunks: int
    attempts: int


class _Retryable(Exception):
    def __init__(self, failure: UpstreamFailure, *, delay_hint: float | None = None) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.delay_hint = delay_hint


def redact(text: str, secret: str | None) -> str:
    """Remove the API key, and anything shaped like one, from text bound for clients or logs.

    Upstream's messages are bounded by cutting their end, which can cut an echoed key in
    two: a text that ends with the key's first characters loses those too.
    """
    if secret:
        text = text.replace(secret, "[redacted]")
        for size in range(len(secret) - 1, _MIN_KEY_FRAGMENT - 1, -1):
            if text.endswith(secret[:size]):
                text = text[:-size] + "[redacted]"
                break
    return _SECRET_LIKE.sub("[redacted]", text)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            # An HTTP-date is always GMT; `-0000` parses naive, which would read as local time.
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


class UpstreamClient:
    """Streams chat completions from `{base_url}/chat/completions` over a shared session."""

    def __init__(self, session: aiohttp.ClientSession, settings: UpstreamSettings) -> None:
        self._session = session
        self._settings = settings
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_connect=settings.connect_timeout
        )
        # Attempts retried, over this client's life (read by the metrics at scrape time).
        self.retries = 0

    @property
    def settings(self) -> UpstreamSettings:
        return self._settings

    async def stream(
        self,
        request: dict[str, Any],
        *,
        on_chunk: Callable[[ChatChunk], None],
        label: str,
        after_read: Callable[[], None] | None = None,
    ) -> StreamEnd:
        """POST `request` with streaming on and feed each parsed chunk to `on_chunk`.

        Retries connection failures, 429 and 5xx up to `max_retries` times, but only
        until the first chunk has been handed over; after that a failure is final, so
        no text is ever duplicated. Returns how the stream ended; raises UpstreamFailure.
        `on_chunk` may raise UpstreamFailure to end the stream. `after_read` is called once
        the chunks of one network read have all been handed over (a natural batch).
        """
        body = orjson.dumps(
            {**request, "stream": True, "stream_options": {"include_usage": True}}
        )
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self._settings.api_key:
            headers["Authorization"] = f"Bearer {self._settings.api_key}"
        total = self._settings.total_timeout
        try:
            async with asyncio.timeout(total if total > 0 else None):
                return await self._attempts(body, headers, on_chunk, after_read, label)
        except TimeoutError:
            # Only the total deadline gets here: every inner timeout became UpstreamFailure.
            raise TotalTimeout(total) from None

    async def _attempts(
        self,
        body: bytes,
        headers: dict[str, str],
        on_chunk: Callable[[ChatChunk], None],
        after_read: Callable[[], None] | None,
        label: str,
    ) -> StreamEnd:
        attempts = 0
        while True:
            attempts += 1
            try:
                chunks, saw_done = await self._attempt(
                    body, headers, on_chunk, after_read or _nothing, label
                )
                return StreamEnd(saw_done_marker=saw_done, chunks=chunks, attempts=attempts)
            except _Retryable as retryable:
                if attempts > self._settings.max_retries:
                    raise retryable.failure from None
                delay = self._backoff(attempts, retryable.delay_hint)
                if delay is None:
                    raise retryable.failure from None
                logger.warning(
                    "%s: upstream attempt %d failed (%s: %s); retrying in %.2f s",
                    label,
                    attempts,
                    retryable.failure.code,
                    retryable.failure.message,
                    delay,
                )
                self.retries += 1
                await asyncio.sleep(delay)

    def _backoff(self, attempts: int, retry_after: float | None) -> float | None:
        settings = self._settings
        if retry_after is not None:
            if retry_after > settings.retry_after_max_seconds:
                return None
            return retry_after
        base = min(
            settings.retry_backoff_max_seconds,
            settings.retry_backoff_seconds * 2.0 ** (attempts - 1),
        )
        return base * random.uniform(0.5, 1.0)

    async def _attempt(
        self,
        body: bytes,
        headers: dict[str, str],
        on_chunk: Callable[[ChatChunk], None],
        after_read: Callable[[], None],
        label: str,
    ) -> tuple[int, bool]:
        settings = self._settings
        loop = asyncio.get_running_loop()
        chunks = 0
        # One deadline for the whole attempt: first the first-chunk bound, then pushed
        # forward by `idle_timeout` at every chunk. Comments (keep-alives) do not count,
        # so an upstream that only ever sends comments still times out.
        deadline = asyncio.timeout(settings.first_chunk_timeout)
        try:
            async with deadline:
                async with self._session.post(
                    self._url, data=body, headers=headers, timeout=self._timeout
                ) as response:
                    await self._check_status(response)
                    decoder = SSEDecoder()
                    async for data in response.content.iter_any():
                        try:
                            events = decoder.feed(data)
                        except LineTooLong as exc:
                            raise UpstreamFailure(TurnErrorCode.UPSTREAM_PROTOCOL, str(exc)) from None
                        for event in events:
                            if event.data == "[DONE]":
                                return chunks, True
                            if event.event == "error":
                                raise UpstreamFailure(
                                    TurnErrorCode.UPSTREAM_ERROR,
                                    self._clean(_error_event_message(event.data)),
                                )
                            chunk = parse_chunk(event.data)
                            chunks += 1
                            deadline.reschedule(loop.time() + settings.idle_timeout)
                            on_chunk(chunk)
                        after_read()
                    decoder.flush()
                    return chunks, False
        except aiohttp.ConnectionTimeoutError:
            # Listed before TimeoutError, which it subclasses.
            raise _Retryable(
                UpstreamFailure(
                    TurnErrorCode.UPSTREAM_TIMEOUT,
                    f"could not connect to upstream within {settings.connect_timeout:g} s",
                )
            ) from None
        except TimeoutError:
            if chunks:
                raise IdleTimeout(settings.idle_timeout) from None
            raise UpstreamFailure(
                TurnErrorCode.UPSTREAM_TIMEOUT,
                f"no chunk from upstream within {settings.first_chunk_timeout:g} s",
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise _Retryable(
                UpstreamFailure(
                    TurnErrorCode.UPSTREAM_UNAVAILABLE,
                    f"could not connect to upstream: {self._clean(str(exc.os_error or exc))}",
                )
            ) from None
        except (
            aiohttp.ClientPayloadError,
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError,
        ) as exc:
            if chunks:
                # Cut mid-stream: the caller sees an ended stream and judges completeness.
                logger.info(
                    "%s: upstream stream cut after %d chunks: %s",
                    label, chunks, type(exc).__name__,
                )
                return chunks, False
            raise _Retryable(
                UpstreamFailure(
                    TurnErrorCode.UPSTREAM_UNAVAILABLE,
                    f"upstream closed the connection before the first chunk ({type(exc).__name__})",
                )
            ) from None
        except UpstreamFailure as failure:
            # In-band errors and error bodies are upstream's words: scrub them once here.
            failure.message = self._clean(failure.message)
            raise
        except aiohttp.ClientError as exc:
            raise UpstreamFailure(
                TurnErrorCode.UPSTREAM_UNAVAILABLE,
                f"upstream request failed: {type(exc).__name__}: {self._clean(str(exc))}",
            ) from None

    async def _check_status(self, response: aiohttp.ClientResponse) -> None:
        if response.status == 200:
            content_type = response.headers.get("Content-Type", "")
            if not content_type.startswith("text/event-stream"):
                raise UpstreamFailure(
                    TurnErrorCode.UPSTREAM_PROTOCOL,
                    f"upstream answered 200 with content type {content_type!r}, "
                    "not text/event-stream",
                )
            return
        raw = await _read_bounded(response.content, _MAX_ERROR_BODY)
        detail = _error_body_message(raw)
        message = self._clean(f"upstream answered HTTP {response.status}: {detail}")
        failure = UpstreamFailure(TurnErrorCode.UPSTREAM_ERROR, message)
        if response.status == 429 or response.status >= 500:
            retry_after = (
                parse_retry_after(response.headers.get("Retry-After"))
                if response.status in (429, 503)
                else None
            )
            raise _Retryable(failure, delay_hint=retry_after)
        raise failure

    def _clean(self, text: str) -> str:
        return redact(text, self._settings.api_key)


def _nothing() -> None:
    return None


async def _read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes:
    """Read a body to its end, or to `limit` bytes, whichever comes first."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        part = await content.read(limit - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def _error_body_message(raw: bytes) -> str:
    try:
        decoded = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8", errors="replace").strip()
        return text[:300] or "(empty body)"
    if isinstance(decoded, dict) and "error" in decoded:
        return describe_upstream_error(decoded["error"])
    return describe_upstream_error(decoded)


def _error_event_message(data: str) -> str:
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data[:300]
    if isinstance(decoded, dict) and "error" in decoded:
        return describe_upstream_error(decoded["error"])
    return describe_upstream_error(decoded)
