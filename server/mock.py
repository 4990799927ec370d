"""The embedded mock upstream: an OpenAI-compatible, streaming-only Chat Completions server.

Owns the deterministic mock answer (`mock_answer`), how an answer is cut into streamed
pieces (`split_into_chunks`) and the aiohttp application that streams them
(`build_mock_app`: `POST /v1/chat/completions`, `GET /v1/models`). Chorus serves it when no
real upstream is configured, and `python -m server.mock` runs it standalone for load tests.
For benchmarks it can stamp each piece with its send time (`MockSettings.stamp`) and hold
every completion until it is released over HTTP (`MockSettings.hold`, `/control/release`).

The wire format follows OpenAI's: `data: <chunk json>\\n\\n` frames, a role chunk, one chunk
per piece, a finish chunk per choice, an optional usage chunk, then `data: [DONE]\\n\\n`.
"Tokens" here are pieces (for `max_tokens` and completion usage) and whitespace-separated
words (for prompt usage); both are deterministic. The Authorization header is neither
checked nor logged.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import math
import re
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import orjson
from aiohttp import web

__all__ = [
    "MAX_CHOICES",
    "MockSettings",
    "build_mock_app",
    "main",
    "mock_answer",
    "split_into_chunks",
]

logger = logging.getLogger(__name__)

MAX_CHOICES = 8
"""The largest `n` the mock accepts (as OpenAI-compatible servers commonly do)."""

_MAX_PIECE_CHARS = 8
_QUOTE_MAX_CHARS = 120
# Every character is either whitespace or not, so these alternatives tile any string.
_PIECE_RE = re.compile(r"\S+\s*|\s+")
_DONE_FRAME = b"data: [DONE]\n\n"
# Standalone only: how long aiohttp lets in-flight streams run on after Ctrl-C/SIGTERM before
# cancelling them (its default of 60 s would hold a load test's shutdown hostage).
_SHUTDOWN_GRACE_SECONDS = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class MockSettings:
    """How the mock streams.

    `chunks_per_second` paces the pieces (0 or negative: as fast as possible, no sleeping);
    `model` is reported when the request names none; `answer_repeat` (>= 1) repeats the
    base answer to make long answers for load tests.

    For benchmarks: `stamp` starts each piece's content with `t=<time.monotonic() when its
    frame is written, 6 decimals>;` (CLOCK_MONOTONIC is system-wide on Linux, so a reader
    in another process can compute publish-to-receive latency); the stamp is not a piece
    of its own and changes no count. `hold` sends each completion's headers, then holds it
    until `POST /control/release`; its pacing starts at the release.
    """

    chunks_per_second: float = 40.0
    model: str = "chorus-mock"
    answer_repeat: int = 1
    stamp: bool = False
    hold: bool = False

    def __post_init__(self) -> None:
        if math.isnan(self.chunks_per_second) or math.isinf(self.chunks_per_second):
            raise ValueError("MockSettings.chunks_per_second must be a finite number")
        if not self.model:
            raise ValueError("MockSettings.model must be a non-empty string")
        if self.answer_repeat < 1:
            raise ValueError("MockSettings.answer_repeat must be at least 1")


# --- the answer ---------------------------------------------------------------------------


def mock_answer(
    messages: Sequence[Mapping[str, object]], *, repeat: int = 1, choice: int = 0
) -> str:
    """Return the mock's answer to `messages`: a pure function of its arguments.

    The answer quotes the last user message (string content, or the text parts of a list
    content) and contains a paragraph, a markdown list, a fenced ```python block, a line of
    non-ASCII text, a double quote and a backslash. It is the base answer repeated `repeat`
    times (joined by a blank line); choice `i > 0` is prefixed with `"(alt i) "`.
    Raises ValueError if `repeat < 1` or `choice < 0`.
    """
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    if choice < 0:
        raise ValueError("choice must not be negative")
    text = "\n\n".join([_base_answer(_last_user_text(messages))] * repeat)
    return f"(alt {choice}) {text}" if choice else text


def _last_user_text(messages: Sequence[Mapping[str, object]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _content_text(content: object) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
        return "\n".join(texts)
    return ""


def _base_answer(question: str) -> str:
    words = question.split()
    quoted = " ".join(words)
    if len(quoted) > _QUOTE_MAX_CHARS:
        quoted = quoted[: _QUOTE_MAX_CHARS - 1].rstrip() + "…"
    if words:
        plural = "" if len(words) == 1 else "s"
        opening = f"You asked: “{quoted}” ({len(words)} word{plural})."
    else:
        opening = "You asked an empty question."
    return (
        f"{opening} This is the Chorus mock upstream, so the answer is canned, "
        "but it is the same every time and it exercises the renderer.\n"
        "\n"
        "Here is what it checks:\n"
        "\n"
        "- **Markdown**: a list, `inline code` and a fenced block\n"
        "- **Unicode**: naïve café — 日本語 ✓ 🎵\n"
        '- **Escaping**: a double quote (") and a backslash (\\) survive JSON\n'
        "\n"
        "```python\n"
        "def echo(question: str) -> str:\n"
        '    """Return the question without surrounding whitespace."""\n'
        "    return question.strip()\n"
        "\n"
        "\n"
        'print(echo("  C:\\\\chorus  "))\n'
        "```\n"
        "\n"
        "That is the whole answer."
    )


def split_into_chunks(text: str) -> list[str]:
    """Cut `text` into streaming pieces such that `"".join(pieces) == text`.

    Each piece is a word with the whitespace that follows it (leading whitespace is a piece
    of its own), cut further into runs of at most 8 code points. No piece is empty; a str
    holds code points, so no piece splits a UTF-16 surrogate pair.
    """
    pieces: list[str] = []
    for match in _PIECE_RE.finditer(text):
        word = match.group()
        pieces.extend(
            word[start : start + _MAX_PIECE_CHARS]
            for start in range(0, len(word), _MAX_PIECE_CHARS)
        )
    return pieces


# --- the request --------------------------------------------------------------------------


class _RequestError(Exception):
    """A request the mock refuses; it becomes a 400 with an OpenAI-shaped error body."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True, kw_only=True)
class _CompletionRequest:
    messages: list[dict[str, object]]
    model: str
    n: int
    max_pieces: int | None
    include_usage: bool


def _parse_request(body: bytes, *, default_model: str) -> _CompletionRequest:
    """Validate a Chat Completions request body; raise _RequestError naming the bad field."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _RequestError("The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise _RequestError("The request body must be a JSON object.")

    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _RequestError("'messages' must be a non-empty array.", param="messages")
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _RequestError(
                f"'messages.{position}' must be an object.", param=f"messages.{position}"
            )

    if payload.get("stream") is not True:
        raise _RequestError(
            'This mock upstream only streams: set "stream": true.', param="stream"
        )

    model = payload.get("model")
    if model is None:
        model = default_model
    elif not isinstance(model, str) or not model:
        raise _RequestError("'model' must be a non-empty string.", param="model")

    n = _optional_int(payload, "n", minimum=1, maximum=MAX_CHOICES)
    # The newer name wins when a client sends both.
    max_pieces = _optional_int(payload, "max_completion_tokens", minimum=1)
    if max_pieces is None:
        max_pieces = _optional_int(payload, "max_tokens", minimum=1)

    stream_options = payload.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _RequestError("'stream_options' must be an object.", param="stream_options")
        flag = stream_options.get("include_usage", False)
        if not isinstance(flag, bool):
            raise _RequestError(
                "'stream_options.include_usage' must be a boolean.",
                param="stream_options.include_usage",
            )
        include_usage = flag

    return _CompletionRequest(
        messages=messages,
        model=model,
        n=1 if n is None else n,
        max_pieces=max_pieces,
        include_usage=include_usage,
    )


def _optional_int(
    payload: Mapping[str, object], name: str, *, minimum: int, maximum: int | None = None
) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    # bool is an int subclass; `true` is not a count.
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise _RequestError(f"'{name}' must be an integer {bounds}.", param=name)
    return value


def _prompt_tokens(messages: Sequence[Mapping[str, object]]) -> int:
    return sum(len(_content_text(message.get("content")).split()) for message in messages)


# --- the stream ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _ChunkEncoder:
    """Encodes the chunks of one completion as SSE frames (the fields they all share)."""

    completion_id: str
    created: int
    model: str
    include_usage: bool
    stamp: bool = False

    def choice(self, index: int, delta: Mapping[str, str], finish_reason: str | None) -> bytes:
        if self.stamp and delta.get("content"):
            # Read the clock here, so the stamp is the time the frame is made: _send_paced
            # makes each frame just before writing it.
            delta = {**delta, "content": f"t={time.monotonic():.6f};{delta['content']}"}
        return self._frame(
            [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        )

    def usage(self, *, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._frame(
            [],
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        )

    def _frame(
        self, choices: list[dict[str, object]], usage: dict[str, int] | None = None
    ) -> bytes:
        chunk: dict[str, object] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        # As OpenAI does: with include_usage every chunk carries "usage", null until the last.
        if self.include_usage:
            chunk["usage"] = usage
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class _ChoicePlan:
    """What one choice will stream: its pieces (already cut to max_tokens) and why it ends."""

    pieces: list[str]
    finish_reason: str

    @classmethod
    def plan(cls, answer: str, *, max_pieces: int | None) -> _ChoicePlan:
        pieces = split_into_chunks(answer)
        if max_pieces is not None and max_pieces < len(pieces):
            return cls(pieces=pieces[:max_pieces], finish_reason="length")
        return cls(pieces=pieces, finish_reason="stop")


_MakeFrame = Callable[[], bytes]


def _completion_frames(
    encoder: _ChunkEncoder, choices: Sequence[_ChoicePlan], *, prompt_tokens: int
) -> Iterator[tuple[int, _MakeFrame]]:
    """Yield `(round, make_frame)` for a whole completion, choices interleaved round by round.

    A frame is made by calling `make_frame()` when it is about to be sent (so a stamp is
    its send time, not the time its round was planned). Round 0 holds every choice's role
    chunk; round k holds the k-th piece of every choice that has one, each followed by that
    choice's finish chunk if it was its last piece. The usage chunk and `[DONE]` share the
    last round.
    """
    for index, choice in enumerate(choices):
        yield 0, partial(encoder.choice, index, {"role": "assistant", "content": ""}, None)
        if not choice.pieces:
            yield 0, partial(encoder.choice, index, {}, choice.finish_reason)
    last_round = max(len(choice.pieces) for choice in choices)
    for round_no in range(1, last_round + 1):
        for index, choice in enumerate(choices):
            if round_no <= len(choice.pieces):
                piece = choice.pieces[round_no - 1]
                yield round_no, partial(encoder.choice, index, {"content": piece}, None)
                if round_no == len(choice.pieces):
                    yield round_no, partial(encoder.choice, index, {}, choice.finish_reason)
    if encoder.include_usage:
        completion_tokens = sum(len(choice.pieces) for choice in choices)
        yield last_round, partial(
            encoder.usage, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
    yield last_round, lambda: _DONE_FRAME


async def _send_paced(
    response: web.StreamResponse, frames: Iterator[tuple[int, _MakeFrame]], *, rate: float
) -> None:
    """Make and write each frame with its own write; round k starts at start + k/rate.

    The schedule is absolute (monotonic loop clock, from the call), so late wake-ups and
    slow writes do not accumulate: a late round is followed by rounds that catch up. With
    `rate <= 0` nothing sleeps, but each round yields to the event loop so one fast stream
    cannot starve others.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    current_round = 0
    for round_no, make_frame in frames:
        if round_no != current_round:
            current_round = round_no
            if rate > 0:
                delay = start + round_no / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
        await response.write(make_frame())


# --- the application ----------------------------------------------------------------------

class _ReleaseGate:
    """Where held completions wait (`MockSettings.hold`) until the next `release()`.

    A release lets every completion held at that moment start; one that arrives later
    waits for the next release. `held` counts the completions waiting now, so a load test
    can release only once all the requests it expects have arrived.
    """

    __slots__ = ("_event", "_held")

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._held = 0

    @property
    def held(self) -> int:
        return self._held

    async def wait(self) -> None:
        event = self._event
        self._held += 1
        try:
            await event.wait()
        finally:
            # A release has already taken this waiter off the count; one that leaves
            # before it (a cancelled handler) takes itself off.
            if not event.is_set():
                self._held -= 1

    def release(self) -> int:
        """Let every held completion start; return how many there were."""
        released, self._held = self._held, 0
        self._event.set()
        self._event = asyncio.Event()
        return released


_SETTINGS_KEY = web.AppKey("mock_settings", MockSettings)
_COMPLETION_IDS_KEY = web.AppKey[Iterator[int]]("mock_completion_ids")
_GATE_KEY = web.AppKey("mock_release_gate", _ReleaseGate)


def build_mock_app(settings: MockSettings) -> web.Application:
    """Return an application serving the mock upstream under `/v1`.

    `POST /v1/chat/completions` answers a streaming request (`"stream": true`, non-empty
    `messages`, optional `model`, `n` in 1..8, `max_tokens`/`max_completion_tokens` >= 1,
    `stream_options.include_usage`) with `mock_answer(messages, repeat=answer_repeat,
    choice=i)` for each choice i, cut by `split_into_chunks`; anything else gets a 400 with
    an OpenAI-shaped error body. Completion ids are `chatcmpl-mock-<n>`, counted per app.
    `GET /v1/models` lists the one model. The app can also be mounted with `add_subapp`.

    With `settings.hold` two control routes are added: `GET /control/held` answers
    `{"held": n}` (completions waiting now) and `POST /control/release` lets them all start
    and answers `{"released": n}`. A held completion whose client has gone stays counted
    until the release unless the server runs with `handler_cancellation`.
    """
    app = web.Application()
    app[_SETTINGS_KEY] = settings
    app[_COMPLETION_IDS_KEY] = itertools.count(1)
    app.router.add_post("/v1/chat/completions", _handle_chat_completions)
    app.router.add_get("/v1/models", _handle_models)
    if settings.hold:
        app[_GATE_KEY] = _ReleaseGate()
        app.router.add_get("/control/held", _handle_held)
        app.router.add_post("/control/release", _handle_release)
    return app


async def _handle_chat_completions(request: web.Request) -> web.StreamResponse:
    settings = request.app[_SETTINGS_KEY]
    try:
        completion = _parse_request(await request.read(), default_model=settings.model)
    except _RequestError as exc:
        return _error_response(exc)

    completion_ids: Iterator[int] = request.app[_COMPLETION_IDS_KEY]
    completion_id = f"chatcmpl-mock-{next(completion_ids)}"
    choices = [
        _ChoicePlan.plan(
            mock_answer(completion.messages, repeat=settings.answer_repeat, choice=index),
            max_pieces=completion.max_pieces,
        )
        for index in range(completion.n)
    ]
    encoder = _ChunkEncoder(
        completion_id=completion_id,
        created=int(time.time()),
        model=completion.model,
        include_usage=completion.include_usage,
        stamp=settings.stamp,
    )
    frames = _completion_frames(
        encoder, choices, prompt_tokens=_prompt_tokens(completion.messages)
    )

    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            # Ask reverse proxies (nginx) not to buffer the stream.
            "X-Accel-Buffering": "no",
        }
    )
    logger.debug(
        "mock completion %s: %d choice(s), at most %d piece(s) each",
        completion_id,
        completion.n,
        max(len(choice.pieces) for choice in choices),
    )
    try:
        await response.prepare(request)
        if settings.hold:
            await request.app[_GATE_KEY].wait()
        await _send_paced(response, frames, rate=settings.chunks_per_second)
        await response.write_eof()
    except ConnectionResetError:
        # The client went away (aiohttp raises ClientConnectionResetError on write).
        logger.debug("mock completion %s: client disconnected", completion_id)
    except asyncio.CancelledError:
        # The handler is cancelled on disconnect when the server runs with
        # handler_cancellation, and on shutdown.
        logger.debug("mock completion %s: cancelled", completion_id)
        raise
    return response


async def _handle_models(request: web.Request) -> web.Response:
    model = request.app[_SETTINGS_KEY].model
    body = {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": 0, "owned_by": "chorus"}],
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _handle_held(request: web.Request) -> web.Response:
    body = {"held": request.app[_GATE_KEY].held}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _handle_release(request: web.Request) -> web.Response:
    released = request.app[_GATE_KEY].release()
    logger.debug("mock: released %d held completion(s)", released)
    return web.Response(body=orjson.dumps({"released": released}), content_type="application/json")


def _error_response(error: _RequestError) -> web.Response:
    body = {
        "error": {
            "message": error.message,
            "type": "invalid_request_error",
            "param": error.param,
            "code": None,
        }
    }
    return web.Response(status=400, body=orjson.dumps(body), content_type="application/json")


# --- standalone ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run the mock upstream standalone until Ctrl-C or SIGTERM (`python -m server.mock`)."""
    defaults = MockSettings()
    parser = argparse.ArgumentParser(
        prog="python -m server.mock",
        description="Chorus mock upstream: an OpenAI-compatible streaming Chat Completions API.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8001, help="port, 0 for any free one (default: %(default)s)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=defaults.chunks_per_second,
        help="pieces per second per choice, 0 for unpaced (default: %(default)s)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=defaults.answer_repeat,
        help="repeat the answer this many times (default: %(default)s)",
    )
    parser.add_argument(
        "--model", default=defaults.model, help="default model name (default: %(default)s)"
    )
    parser.add_argument(
        "--stamp",
        action="store_true",
        help="start each piece's content with 't=<monotonic send time>;' (for latency)",
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="hold each completion after its headers until POST /control/release",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)

    try:
        settings = MockSettings(
            chunks_per_second=args.rate,
            model=args.model,
            answer_repeat=args.repeat,
            stamp=args.stamp,
            hold=args.hold,
        )
    except ValueError as exc:
        parser.error(str(exc))

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(_serve(settings, host=args.host, port=args.port))
    except KeyboardInterrupt:
        pass  # Ctrl-C: _serve has already cleaned up.
    except OSError as exc:
        # Most likely the address is in use or not ours to bind.
        logger.error("mock upstream could not start: %s", exc)
        raise SystemExit(1) from None


async def _serve(settings: MockSettings, *, host: str, port: int) -> None:
    runner = web.AppRunner(build_mock_app(settings), shutdown_timeout=_SHUTDOWN_GRACE_SECONDS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        # Report the bound port, which differs from `port` when it was 0.
        bound_port = runner.addresses[0][1] if runner.addresses else port
        url_host = f"[{host}]" if ":" in host else host
        pace = (
            f"{settings.chunks_per_second:g} chunks/s"
            if settings.chunks_per_second > 0
            else "unpaced"
        )
        extras = (", stamped" if settings.stamp else "") + (
            ", held until released" if settings.hold else ""
        )
        logger.info(
            "mock upstream listening on http://%s:%d/v1 (%s%s)", url_host, bound_port, pace, extras
        )
        try:
            await _wait_for_stop_signal()
        finally:
            logger.info("mock upstream shutting down")
    finally:
        await runner.cleanup()


async def _wait_for_stop_signal() -> None:
    """Return on SIGTERM; Ctrl-C cancels the caller through asyncio.run as usual."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    except (NotImplementedError, RuntimeError):
        pass  # No signal handlers on this platform or thread: only Ctrl-C stops us.
    try:
        await stop.wait()
    finally:
        try:
            loop.remove_signal_handler(signal.SIGTERM)
        except (NotImplementedError, RuntimeError):
            pass


if __name__ == "__main__":
    main()
