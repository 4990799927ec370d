"""The load test's verdict: numbers from the subscribers' records, as a table or JSON.

`build_report` is pure (records in, a frozen `Report` out); `render_table` and
`render_json` only format it. The table and the JSON carry the same facts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import orjson

from .runner import ConversationState, LoadTestResult, StopReason
from .stats import Distribution, text_digest
from .subscriber import DONE, FINISHED_TURN, INTERRUPTED, TIMEOUT, SubscriberRecord

__all__ = ["Report", "build_report", "render_json", "render_table"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriberTotals:
    total: int
    connected: int
    finished_ok: int
    failed: int
    timed_out: int
    interrupted: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EventTotals:
    delivered: int
    # Over the active window: first subscriber request to last event received.
    per_second: float | None
    window_seconds: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Completeness:
    """Subscribers that saw turn 0 end with every id once, in order, and no hole."""

    complete: int
    total: int
    percent: float
    with_snapshot: int
    missing_ids: int
    duplicate_ids: int
    out_of_order_ids: int
    invalid_ids: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerVariant:
    """One distinct answer text that finished subscribers assembled."""

    sha256: str
    chars: int
    subscribers: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationReport:
    id: str
    subscribers: int
    finished: int
    complete: int
    turn_status: str | None
    # Did every subscriber that saw turn 0 end assemble the same text? None: none did.
    identical: bool | None
    # ... and is it GET /v1/conversations/{id} turns[0].choices[0].content? None: unknown.
    matches_state: bool | None
    state_sha256: str | None
    state_chars: int | None
    state_error: str | None
    answers: list[AnswerVariant]


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    ok: bool
    url: str
    stop_reason: str
    duration_seconds: float
    duration_limit_seconds: float
    conversations: list[ConversationReport]
    subscribers: SubscriberTotals
    events: EventTotals
    time_to_first_event_ms: Distribution
    inter_event_gap_ms: Distribution
    completeness: Completeness
    identical_conversations: int
    errors: dict[str, int]


def _is_complete(record: SubscriberRecord) -> bool:
    return record.outcome in FINISHED_TURN and record.sequence.report().complete


def _conversation_report(
    conversation_id: str, records: list[SubscriberRecord], state: ConversationState | None
) -> ConversationReport:
    finished = [r for r in records if r.outcome in FINISHED_TURN]
    variants = Counter((r.answer.hexdigest, r.answer.chars) for r in finished)
    identical = len(variants) == 1 if finished else None
    state_sha256 = None
    if state is not None and state.content is not None:
        state_sha256 = text_digest(state.content)
    matches_state = None
    if identical and state_sha256 is not None:
        matches_state = next(iter(variants))[0] == state_sha256
    return ConversationReport(
        id=conversation_id,
        subscribers=len(records),
        finished=len(finished),
        complete=sum(1 for r in records if _is_complete(r)),
        turn_status=state.status if state is not None else None,
        identical=identical,
        matches_state=matches_state,
        state_sha256=state_sha256,
        state_chars=None if state is None or state.content is None else len(state.content),
        state_error=state.error if state is not None else "not fetched",
        answers=[
            AnswerVariant(sha256=digest, chars=chars, subscribers=count)
            for (digest, chars), count in variants.most_common()
        ],
    )


def build_report(result: LoadTestResult) -> Report:
    records = result.records
    states = {state.id: state for state in result.states}
    conversations = [
        _conversation_report(
            cid, [r for r in records if r.conversation_id == cid], states.get(cid)
        )
        for cid in result.conversation_ids
    ]
    sequences = [r.sequence.report() for r in records]
    complete = sum(1 for r in records if _is_complete(r))
    delivered = sum(r.events for r in records)
    requested = [r.requested_at for r in records if r.requested_at is not None]
    received = [r.last_event_at for r in records if r.last_event_at is not None]
    window = max(received) - min(requested) if requested and received else None
    errors = Counter(kind for r in records if (kind := r.error_kind) is not None)
    totals = SubscriberTotals(
        total=len(records),
        connected=sum(1 for r in records if r.connected_at is not None),
        finished_ok=sum(1 for r in records if r.outcome == DONE),
        failed=sum(1 for r in records if r.outcome not in (DONE, TIMEOUT, INTERRUPTED)),
        timed_out=sum(1 for r in records if r.outcome == TIMEOUT),
        interrupted=sum(1 for r in records if r.outcome == INTERRUPTED),
    )
    identical = sum(1 for c in conversations if c.identical and c.matches_state)
    return Report(
        ok=bool(records)
        and complete == len(records)
        and identical == len(conversations)
        and not errors,
        url=result.config.base_url,
        stop_reason=result.stop_reason,
        duration_seconds=result.ended_at - result.started_at,
        duration_limit_seconds=result.config.duration_seconds,
        conversations=conversations,
        subscribers=totals,
        events=EventTotals(
            delivered=delivered,
            per_second=delivered / window if window else None,
            window_seconds=window,
        ),
        time_to_first_event_ms=Distribution.of(
            (t for r in records if (t := r.time_to_first_event) is not None), scale=1000.0
        ),
        inter_event_gap_ms=Distribution.of(
            (gap for r in records for gap in r.gaps), scale=1000.0
        ),
        completeness=Completeness(
            complete=complete,
            total=len(records),
            percent=100.0 * complete / len(records) if records else 0.0,
            with_snapshot=sum(1 for s in sequences if s.snapshot_jumps),
            missing_ids=sum(s.missing for s in sequences),
            duplicate_ids=sum(s.duplicates for s in sequences),
            out_of_order_ids=sum(s.out_of_order for s in sequences),
            invalid_ids=sum(s.invalid for s in sequences),
        ),
        identical_conversations=identical,
        errors=dict(errors.most_common()),
    )


def render_json(report: Report) -> bytes:
    return orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)


_STOP_TEXT = {
    StopReason.FINISHED: "every subscriber finished",
    StopReason.DURATION: "--duration expired",
    StopReason.INTERRUPTED: "interrupted",
}


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.1f} ms"


def _distribution(d: Distribution) -> str:
    return f"p50 {_ms(d.p50)}   p99 {_ms(d.p99)}   max {_ms(d.max)}   (n={d.count:,})"


def _verdict(c: ConversationReport) -> str:
    if c.identical is None:
        return "no subscriber finished"
    if not c.identical:
        return f"DIFFERENT: {len(c.answers)} distinct answers"
    if c.matches_state is None:
        return f"identical, state unavailable ({c.state_error})"
    if not c.matches_state:
        return "identical, but NOT equal to GET state"
    return f"identical, equal to GET state ({c.state_chars:,} chars)"


def render_table(report: Report) -> str:
    s, e, c = report.subscribers, report.events, report.completeness
    rate = f"{e.per_second:,.0f} events/s over {e.window_seconds:.2f} s" if e.per_second else "-"
    lines = [
        f"Chorus load test  {report.url}  ({_STOP_TEXT.get(report.stop_reason, report.stop_reason)}"
        f" after {report.duration_seconds:.2f} s of {report.duration_limit_seconds:g} s)",
        f"  conversations         {len(report.conversations)}",
        f"  subscribers           {s.total:,}   connected {s.connected:,}   finished ok "
        f"{s.finished_ok:,}   failed {s.failed:,}   timed out {s.timed_out:,}"
        + (f"   interrupted {s.interrupted:,}" if s.interrupted else ""),
        f"  events delivered      {e.delivered:,}   ({rate})",
        f"  time to first event   {_distribution(report.time_to_first_event_ms)}",
        f"  inter-event gap       {_distribution(report.inter_event_gap_ms)}",
        f"  completeness          {c.complete:,}/{c.total:,} ({c.percent:.1f}%)   "
        f"via snapshot {c.with_snapshot:,}   missing ids {c.missing_ids:,}   "
        f"duplicates {c.duplicate_ids:,}   out of order {c.out_of_order_ids:,}"
        + (f"   invalid ids {c.invalid_ids:,}" if c.invalid_ids else ""),
        f"  identical answers     {report.identical_conversations}/{len(report.conversations)}"
        " conversations (every finished subscriber, and equal to GET state)",
    ]
    for conv in report.conversations:
        lines.append(
            f"    {conv.id}  turn 0 {conv.turn_status or '?'}   finished "
            f"{conv.finished}/{conv.subscribers}   {_verdict(conv)}"
        )
    if report.errors:
        lines.append("  errors by kind")
        lines.extend(f"    {kind:<40} {count:,}" for kind, count in report.errors.items())
    else:
        lines.append("  errors by kind        none")
    lines.append(f"result: {'OK' if report.ok else 'FAILED'}")
    return "\n".join(lines) + "\n"
