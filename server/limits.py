"""The `[limits]` bounds on who may start turns and who may subscribe.

Owns the per-caller start-rate limiter (a sliding window per caller identity) and the
admission checks for subscribers. The counts it judges belong to their owners: the hub
counts subscribers, the registry counts live turns and enforces that bound itself. Every
refusal is an `ApiError` with a `Retry-After`; nothing here writes HTTP responses.

A caller's identity comes from a small callable (`CallerIdentity`) so the limiter does not
care how callers are told apart: the remote address until authentication says otherwise.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from aiohttp import web

from .config import LimitsSettings
from .errors import ServiceUnavailable, TooManyRequests

CallerIdentity = Callable[[web.Request], str]
Clock = Callable[[], float]

# What a refused subscriber is told to wait: a slot frees up whenever anyone leaves, which
# cannot be predicted, so a short fixed hint.
SUBSCRIBER_RETRY_AFTER_SECONDS = 5
START_WINDOW_SECONDS = 60.0
# Callers tracked at once by the start limiter; each holds at most `limit` timestamps.
MAX_TRACKED_CALLERS = 10_000


def remote_address(request: web.Request) -> str:
    """The default caller identity: the peer's address (a proxy's, behind one)."""
    return request.remote or "unknown"


def _seconds_until(moment: float, now: float) -> int:
    """A `Retry-After` value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(moment - now))


class StartRateLimiter:
    """At most `limit` starts per caller in any `window_seconds` (a sliding log per caller).

    Use `check(caller)` right before starting and `record(caller)` once the start succeeded,
    with no await in between, so concurrent requests cannot both slip under the limit and a
    refused or failed start costs the caller nothing.

    Memory is bounded: a caller holds at most `limit` timestamps; a caller with no start left
    in the window is forgotten (nothing is lost, its count is 0); and at most `max_callers`
    are tracked at once. When that many callers have all started something within the
    window, a new caller is refused with 503 `too_many_callers` rather than letting an
    existing caller's history be dropped (which would silently lift its limit).
    """

    __slots__ = ("_limit", "_window", "_max_callers", "_clock", "_starts")

    def __init__(
        self,
        *,
        limit: int,
        window_seconds: float = START_WINDOW_SECONDS,
        max_callers: int = MAX_TRACKED_CALLERS,
        clock: Clock = time.monotonic,
    ) -> None:
        if limit < 1 or window_seconds <= 0 or max_callers < 1:
            raise ValueError("a start limiter needs limit >= 1, window > 0 and max_callers >= 1")
        self._limit = limit
        self._window = window_seconds
        self._max_callers = max_callers
        self._clock = clock
        # Least recently started first: a caller moves to the end on each start, so idle
        # callers are pruned from the front in O(1) each.
        self._starts: OrderedDict[str, deque[float]] = OrderedDict()

    @property
    def tracked_callers(self) -> int:
        return len(self._starts)

    def starts_in_window(self, caller: str) -> int:
        self._prune(self._clock())
        starts = self._starts.get(caller)
        return 0 if starts is None else len(starts)

    def check(self, caller: str) -> None:
        """Raise `TooManyRequests` (`rate_limited`) when `caller` has used its budget, with
        `retry_after` = the seconds until its oldest start leaves the window; raise
        `ServiceUnavailable` (`too_many_callers`) when a new caller cannot be tracked."""
        now = self._clock()
        self._prune(now)
        starts = self._starts.get(caller)
        if starts is None:
            if len(self._starts) >= self._max_callers:
                oldest_caller = next(iter(self._starts.values()))
                raise ServiceUnavailable(
                    f"too many callers are starting conversations (over {self._max_callers} "
                    "this minute); try again later",
                    code="too_many_callers",
                    retry_after=_seconds_until(oldest_caller[-1] + self._window, now),
                )
            return
        self._expire(starts, now)
        if len(starts) >= self._limit:
            raise TooManyRequests(
                f"at most {self._limit} conversation starts (creates and follow-ups) per "
                f"{self._window:g} s per caller; try again later",
                code="rate_limited",
                retry_after=_seconds_until(starts[0] + self._window, now),
            )

    def record(self, caller: str) -> None:
        """Count one start for `caller`, now (after `check` let it through)."""
        now = self._clock()
        starts = self._starts.get(caller)
        if starts is None:
            starts = self._starts[caller] = deque(maxlen=self._limit)
        else:
            self._expire(starts, now)
            self._starts.move_to_end(caller)
        starts.append(now)

    def _expire(self, starts: deque[float], now: float) -> None:
        horizon = now - self._window
        while starts and starts[0] <= horizon:
            starts.popleft()

    def _prune(self, now: float) -> None:
        """Forget callers whose newest start has left the window."""
        horizon = now - self._window
        callers = self._starts
        while callers:
            caller, starts = next(iter(callers.items()))
            if starts[-1] > horizon:
                return
            del callers[caller]


class Limits:
    """The `[limits]` checks the HTTP handlers make before starting anything.

    `max_messages` is checked by `parse_chat_start`, `max_live_conversations` by the
    registry (it owns the turns); the rest are here.
    """

    __slots__ = ("_settings", "_identity", "_starts")

    def __init__(
        self,
        settings: LimitsSettings,
        *,
        identity: CallerIdentity = remote_address,
        clock: Clock = time.monotonic,
        max_callers: int = MAX_TRACKED_CALLERS,
    ) -> None:
        self._settings = settings
        self._identity = identity
        self._starts: StartRateLimiter | None = None
        if settings.starts_per_minute_per_key:
            self._starts = StartRateLimiter(
                limit=settings.starts_per_minute_per_key, max_callers=max_callers, clock=clock
            )

    def caller(self, request: web.Request) -> str:
        """Who is asking: the identity starts are counted (and idempotency keys kept) by."""
        return self._identity(request)

    def check_start(self, caller: str) -> None:
        """Raise when `caller` may not start a turn now (see `StartRateLimiter.check`)."""
        if self._starts is not None:
            self._starts.check(caller)

    def record_start(self, caller: str) -> None:
        if self._starts is not None:
            self._starts.record(caller)

    def admit_subscriber(self, *, conversation_subscribers: int, total_subscribers: int) -> None:
        """Raise when one more subscriber would exceed a subscriber bound: 503 `server_full`
        for the process-wide one, 429 `too_many_subscribers` for the conversation's."""
        settings = self._settings
        total = settings.max_subscribers_total
        if total and total_subscribers >= total:
            raise ServiceUnavailable(
                f"this server has its maximum of {total} subscribers; try again later",
                code="server_full",
                retry_after=SUBSCRIBER_RETRY_AFTER_SECONDS,
            )
        per_conversation = settings.max_subscribers_per_conversation
        if per_conversation and conversation_subscribers >= per_conversation:
            raise TooManyRequests(
                f"this conversation has its maximum of {per_conversation} subscribers; "
                "try again later",
                code="too_many_subscribers",
                retry_after=SUBSCRIBER_RETRY_AFTER_SECONDS,
            )
