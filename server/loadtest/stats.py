"""Pure measurement helpers for the load test: no I/O, no clocks, no asyncio.

Owns the percentile summary (`Distribution`), the event-id sequence check
(`SequenceChecker`, `check_sequence`) and the running answer fingerprint (`AnswerDigest`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "AnswerDigest",
    "Distribution",
    "SequenceChecker",
    "SequenceReport",
    "Snapshot",
    "check_sequence",
    "percentile",
    "text_digest",
]


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The nearest-rank `p`th percentile (0 < p <= 100) of already sorted values.

    Nearest rank always returns one of the values (no interpolation), so p99 of 100 values
    is the 99th smallest. Raises ValueError on an empty sequence or a p out of range.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p!r}")
    rank = math.ceil(p / 100 * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


@dataclass(frozen=True, slots=True, kw_only=True)
class Distribution:
    """count, p50, p99 and max of a set of measurements (None when there are none)."""

    count: int
    p50: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, values: Iterable[float], *, scale: float = 1.0) -> Distribution:
        """Summarize `values`, each multiplied by `scale` (e.g. 1000 for seconds to ms)."""
        ordered = sorted(values)
        if not ordered:
            return cls(count=0, p50=None, p99=None, max=None)
        return cls(
            count=len(ordered),
            p50=percentile(ordered, 50) * scale,
            p99=percentile(ordered, 99) * scale,
            max=ordered[-1] * scale,
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A `snapshot` event's id in a list given to `check_sequence`."""

    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SequenceReport:
    """The verdict on one subscriber's event ids."""

    count: int
    missing: int
    gaps: int
    duplicates: int
    out_of_order: int
    snapshot_jumps: int
    invalid: int

    @property
    def complete(self) -> bool:
        """At least one id, and every id once, in order, with no hole (snapshots allowed)."""
        return self.count > 0 and not (
            self.missing or self.duplicates or self.out_of_order or self.invalid
        )


class SequenceChecker:
    """Checks, id by id, that events arrive as start, start+1, start+2 ... with no hole.

    A `snapshot` with id s stands for every event up to s, so it legitimately jumps forward
    (counted in `snapshot_jumps`); live events continue at s+1. An id that skips ahead
    opens a hole (`missing` ids in `gaps` holes); an id that later fills a hole is
    `out_of_order`; an id already seen (or covered by a snapshot) is a duplicate. Holes are
    kept as ranges, so memory grows with the number of holes, not the number of events.
    With `start=None` the first id received is taken as the start.
    """

    __slots__ = (
        "_last", "_holes", "count", "duplicates", "out_of_order", "snapshot_jumps", "invalid"
    )

    def __init__(self, *, start: int | None = 1) -> None:
        self._last: int | None = None if start is None else start - 1
        self._holes: list[list[int]] = []  # [first, last] ids never received, ascending
        self.count = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.snapshot_jumps = 0
        self.invalid = 0

    def feed(self, seq: int, *, snapshot: bool = False) -> None:
        self.count += 1
        last = self._last
        if last is None:
            self._last = seq
            return
        if seq > last:
            if snapshot:
                self.snapshot_jumps += 1
            elif seq > last + 1:
                self._holes.append([last + 1, seq - 1])
            self._last = seq
        elif not snapshot and self._fill_hole(seq):
            self.out_of_order += 1
        elif snapshot and seq < last:
            # A snapshot older than what was already received goes backwards.
            self.out_of_order += 1
        else:
            self.duplicates += 1

    def feed_invalid(self) -> None:
        """An event that should carry a numeric id did not."""
        self.count += 1
        self.invalid += 1

    def _fill_hole(self, seq: int) -> bool:
        for position, (first, last) in enumerate(self._holes):
            if first <= seq <= last:
                pieces = [[first, seq - 1], [seq + 1, last]]
                self._holes[position : position + 1] = [p for p in pieces if p[0] <= p[1]]
                return True
        return False

    def report(self) -> SequenceReport:
        return SequenceReport(
            count=self.count,
            missing=sum(last - first + 1 for first, last in self._holes),
            gaps=len(self._holes),
            duplicates=self.duplicates,
            out_of_order=self.out_of_order,
            snapshot_jumps=self.snapshot_jumps,
            invalid=self.invalid,
        )


def check_sequence(ids: Iterable[int | Snapshot], *, start: int | None = 1) -> SequenceReport:
    """Check a whole list of event ids at once (`Snapshot(s)` marks a snapshot's id)."""
    checker = SequenceChecker(start=start)
    for item in ids:
        if isinstance(item, Snapshot):
            checker.feed(item.seq, snapshot=True)
        else:
            checker.feed(item)
    return checker.report()


def text_digest(text: str) -> str:
    """The SHA-256 hex digest of `text` as UTF-8 (what `AnswerDigest` computes piecewise)."""
    return hashlib.sha256(text.encode()).hexdigest()


class AnswerDigest:
    """A running fingerprint of an answer assembled piece by piece.

    Subscribers keep this instead of the text, so 10,000 subscribers of a long answer cost
    10,000 hashes, not 10,000 copies. `reset` restarts from a snapshot's content.
    """

    __slots__ = ("_hash", "chars")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.chars = 0

    def add(self, piece: str) -> None:
        self._hash.update(piece.encode())
        self.chars += len(piece)

    def reset(self, text: str) -> None:
        self._hash = hashlib.sha256()
        self.chars = 0
        self.add(text)

    @property
    def hexdigest(self) -> str:
        return self._hash.hexdigest()
