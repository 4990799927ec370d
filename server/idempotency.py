"""Idempotency keys: the first answer to a request, remembered for a window.

Owns the bounded store of answers keyed by (caller, route, Idempotency-Key) and the rules
for a repeat: the same body gets the stored answer, a different body is refused, a repeat
of a request still being handled is refused. Pure: no HTTP here (see
`idempotency_route.py`), and time comes from an injectable clock.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .errors import Conflict, InvalidRequest, ServiceUnavailable, UnprocessableEntity

MAX_KEY_LENGTH = 255
# Entries held at once. An entry is a few hundred bytes (the key, a digest, the answer).
MAX_ENTRIES = 100_000

# (caller identity, route such as "POST /v1/conversations", Idempotency-Key)
EntryKey = tuple[str, str, str]


def check_idempotency_key(raw: str) -> str:
    """The key itself when it is 1..255 printable ASCII characters; else `InvalidRequest`."""
    if not 1 <= len(raw) <= MAX_KEY_LENGTH or not all(" " <= c <= "~" for c in raw):
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
            code="invalid_idempotency_key",
        )
    return raw


def fingerprint(body: bytes) -> bytes:
    """What "the same request" means: the same body, byte for byte."""
    return hashlib.sha256(body).digest()


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A successful answer as it was sent: status, JSON body, and the headers its handler
    set (a watch cookie, for one), in order."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class _Entry:
    __slots__ = ("fingerprint", "expires_at", "response")

    def __init__(self, fingerprint: bytes, expires_at: float) -> None:
        self.fingerprint = fingerprint
        self.expires_at = expires_at
        # None while the first request is still being handled.
        self.response: StoredResponse | None = None


class IdempotencyStore:
    """Answers remembered for `window_seconds` after the first request, at most `max_entries`.

    Protocol per request carrying a key: `begin`; then, if it returned None, handle the
    request and `finish` with the answer when it succeeded; `abandon` in every case
    (a no-op once finished), so a failed request leaves nothing behind and its retry runs.

    Full (every entry still inside its window): a new key is refused with 503
    `idempotency_store_full` rather than dropping an entry whose retry would then run twice.
    """

    __slots__ = ("_window", "_max_entries", "_clock", "_entries")

    def __init__(
        self,
        *,
        window_seconds: float,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_seconds < 0 or max_entries < 1:
            raise ValueError("an idempotency store needs window >= 0 and max_entries >= 1")
        self._window = window_seconds
        self._max_entries = max_entries
        self._clock = clock
        # Oldest first; the window is the same for all, so this is also expiry order.
        self._entries: OrderedDict[EntryKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        self._prune(self._clock())
        return len(self._entries)

    def begin(self, key: EntryKey, request_fingerprint: bytes) -> StoredResponse | None:
        """The stored answer for a repeat of a finished request; None for a first request,
        which is now reserved under `key`.

        Raises `UnprocessableEntity` (`idempotency_key_reused`) when `key` was used with a
        different body, `Conflict` (`idempotency_key_in_progress`) when the first request
        with this body is still being handled, `ServiceUnavailable` when the store is full.
        """
        now = self._clock()
        self._prune(now)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.fingerprint != request_fingerprint:
                raise UnprocessableEntity(
                    "this Idempotency-Key was already used with a different request body; "
                    "use a new key for a new request",
                    code="idempotency_key_reused",
                )
            if entry.response is None:
                raise Conflict(
                    "a request with this Idempotency-Key is still being handled; "
                    "retry when it has been answered",
                    code="idempotency_key_in_progress",
                )
            return entry.response
        if len(self._entries) >= self._max_entries:
            oldest = next(iter(self._entries.values()))
            raise ServiceUnavailable(
                f"{self._max_entries} idempotency keys are held already; try again later",
                code="idempotency_store_full",
                retry_after=max(1, math.ceil(oldest.expires_at - now)),
            )
        self._entries[key] = _Entry(request_fingerprint, now + self._window)
        return None

    def finish(self, key: EntryKey, response: StoredResponse) -> None:
        """Remember `response` as the answer for `key` (reserved by `begin`)."""
        entry = self._entries.get(key)
        if entry is not None and entry.response is None:
            entry.response = response

    def abandon(self, key: EntryKey) -> None:
        """Drop the reservation of `key` unless it was finished."""
        entry = self._entries.get(key)
        if entry is not None and entry.response is None:
            del self._entries[key]

    def _prune(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if entry.expires_at > now:
                return
            del entries[key]
