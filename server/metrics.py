"""Metrics: what `GET /metrics` exposes, in Prometheus' text format (or OpenMetrics).

Owns one `CollectorRegistry` per application (never prometheus-client's process-global
default registry: each app, and the tests build many, has its own), and the two ways its
values are gathered:

- `StateCollector` reads gauges and running totals at scrape time, from the conversation
  registry, the hub's `SubscriberTally` and the upstream client's retry count, so the hot
  path (publish, flush, per-chunk work) pays nothing for metrics;
- `TurnMetrics`, a `ConversationObserver`, counts turn outcomes and times turns: a few
  operations once per turn, never per chunk or per subscriber.

Nothing here labels a series by conversation id: cardinality stays fixed.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .conversations import ConversationRegistry
from .errors import TurnErrorCode
from .hub import Hub
from .observers import TurnOutcome
from .transcript import CANCELLED_STATUS, DONE_STATUS, ERROR_STATUS, STREAMING
from .upstream import UpstreamClient

# Every status and outcome is exported from the start (at 0), so a rate or an alert on
# one that has not happened yet has a series to read.
CONVERSATION_STATUSES = (STREAMING, DONE_STATUS, ERROR_STATUS, CANCELLED_STATUS)
TURN_OUTCOMES = ("done", *(str(code) for code in TurnErrorCode))

# Seconds. A model's first token takes from tens of milliseconds (a local model, warm) to
# tens of seconds (a long prompt, a busy API); upstream.first_chunk_timeout is 60 s.
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0,
)
# Seconds. Whole answers: a second for a short one to upstream.total_timeout (600 s).
UPSTREAM_DURATION_BUCKETS = (
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)


class StateCollector:
    """Values read when scraped: what is held now, and the running totals kept elsewhere."""

    def __init__(
        self, *, conversations: ConversationRegistry, hub: Hub, client: UpstreamClient
    ) -> None:
        self._conversations = conversations
        self._hub = hub
        self._client = client

    def collect(self) -> Iterator[Metric]:
        by_status = dict.fromkeys(CONVERSATION_STATUSES, 0)
        for conversation in self._conversations.all():
            status = conversation.status
            by_status[status] = by_status.get(status, 0) + 1
        conversations = GaugeMetricFamily(
            "chorus_conversations", "Conversations held, by status.", labels=["status"]
        )
        for status, count in by_status.items():
            conversations.add_metric([status], count)
        yield conversations
        yield GaugeMetricFamily(
            "chorus_live_turns",
            "Turns whose upstream request is running now.",
            value=self._conversations.live_turns,
        )
        yield GaugeMetricFamily(
            "chorus_subscribers",
            "SSE subscribers attached now, across all conversations.",
            value=self._hub.subscriber_count,
        )
        tally = self._hub.counters
        yield CounterMetricFamily(
            "chorus_events_published",
            "Events appended to conversations' logs (each is encoded once).",
            value=tally.events_published,
        )
        yield CounterMetricFamily(
            "chorus_deliveries",
            "Events handed to subscribers' connections (one per event per subscriber; "
            "a snapshot counts the events it stands for).",
            value=tally.deliveries,
        )
        yield CounterMetricFamily(
            "chorus_sent_bytes",
            "Bytes of events handed to subscribers' connections (heartbeats and the "
            "retry hint excluded, HTTP chunk framing excluded).",
            value=tally.bytes_sent,
        )
        yield CounterMetricFamily(
            "chorus_replays",
            "Subscribers that attached behind the live edge and were replayed to.",
            value=tally.replays,
        )
        yield CounterMetricFamily(
            "chorus_snapshots",
            "Snapshot frames sent instead of a replay the buffer no longer held.",
            value=tally.snapshots,
        )
        yield CounterMetricFamily(
            "chorus_subscribers_dropped",
            "Subscribers dropped because their writes did not drain within "
            "hub.send_timeout.",
            value=tally.dropped,
        )
        yield CounterMetricFamily(
            "chorus_upstream_retries",
            "Upstream attempts retried (connect errors, 429, 5xx before the first chunk).",
            value=self._client.retries,
        )


class TurnMetrics:
    """A `ConversationObserver` that counts turn outcomes and times turns."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter(
            "chorus_upstream_requests",
            "Turns, each one upstream streaming request (retries included), by how they "
            "ended: done or the error event's code.",
            ["outcome"],
            registry=registry,
        )
        for outcome in TURN_OUTCOMES:
            self._requests.labels(outcome)
        self._time_to_first_token = Histogram(
            "chorus_time_to_first_token_seconds",
            "From a turn's start (retries included) to upstream's first chunk.",
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self._upstream_duration = Histogram(
            "chorus_upstream_duration_seconds",
            "From a turn's start to its done or error event, whatever the outcome.",
            buckets=UPSTREAM_DURATION_BUCKETS,
            registry=registry,
        )

    def conversation_created(self, conversation_id: str, model: str) -> None:
        return None

    def turn_started(self, conversation_id: str, turn: int, model: str) -> None:
        return None

    def first_chunk(self, conversation_id: str, turn: int, seconds: float) -> None:
        self._time_to_first_token.observe(seconds)

    def turn_ended(self, outcome: TurnOutcome) -> None:
        self._requests.labels(outcome.outcome).inc()
        self._upstream_duration.observe(outcome.seconds)

    def conversation_ended(self, conversation_id: str, reason: str) -> None:
        return None


class Metrics:
    """One application's metrics: its registry, and the observer to register with the
    conversation registry (`conversations.observers.add(metrics.turns)`)."""

    __slots__ = ("registry", "turns")

    def __init__(
        self, *, conversations: ConversationRegistry, hub: Hub, client: UpstreamClient
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(
            StateCollector(conversations=conversations, hub=hub, client=client)
        )
        self.turns = TurnMetrics(self.registry)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type, in the format `accept` asks for
        (OpenMetrics when asked, else Prometheus' text format 0.0.4)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
