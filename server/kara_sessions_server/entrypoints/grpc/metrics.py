"""Prometheus metrics, served over HTTP on their own port (`--metrics-port`).

Each server has its own registry, so several servers can live in one process (as in the tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kara_sessions_server.domain.model import LedgerKind, SessionState
from kara_sessions_server.domain.tallies import (
    ChargeWaived,
    CreditsMoved,
    FeedAppended,
    InvoiceChanged,
    NoShowMarked,
    SessionCancelled,
    SessionRescheduled,
    SettledAutomatically,
    Tally,
)

# Seconds; a cancellation on SQLite takes about a millisecond, a slow PostgreSQL one tens of ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.rpcs = Counter(
            "kara_rpc_requests", "RPCs handled, by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "kara_rpc_duration_seconds",
            "Time to handle an RPC, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cancellations = Counter(
            "kara_cancellations",
            "Committed cancellations by outcome (voided/paid), timing (late/on_time) and party",
            ["outcome", "timing", "cancelled_by"],
            registry=r,
        )
        self.reschedules = Counter(
            "kara_reschedules",
            "Committed reschedules by outcome (moved in place/charged), timing (late/on_time) and party",
            ["outcome", "timing", "rescheduled_by"],
            registry=r,
        )
        self.credits = Counter(
            "kara_credits_moved",
            "Credits moved by committed requests, by ledger entry kind "
            f"({', '.join(kind.value for kind in LedgerKind)})",
            ["kind"],
            registry=r,
        )
        self.invoice_actions = Counter(
            "kara_invoice_actions",
            "Committed invoice changes by action (CREATE, ADD, REMOVE, SUBMIT)",
            ["action"],
            registry=r,
        )
        self.invoiced_sessions = Counter(
            "kara_invoice_sessions",
            "Sessions put on (CREATE, ADD) or taken off (REMOVE) invoices by committed requests",
            ["action"],
            registry=r,
        )
        self.no_shows = Counter(
            "kara_no_shows",
            "Committed no-shows by outcome (paid: the credit taken; voided: returned)",
            ["outcome"],
            registry=r,
        )
        self.waivers = Counter("kara_waivers", "Committed waivers of a charge", registry=r)
        self.settled_automatically = Counter(
            "kara_settled_automatically",
            "Sessions nobody marked that the server settled (its programme's settle_unmarked_after), "
            "by the state it gave them",
            ["state"],
            registry=r,
        )
        self.events_appended = Counter(
            "kara_events_appended",
            "Events appended to the feed by committed changes, by type",
            ["type"],
            registry=r,
        )
        self.event_streams = Gauge(
            "kara_event_streams_open", "StreamEvents calls open now on this server", registry=r
        )
        self.event_lag = Histogram(
            "kara_event_stream_lag_seconds",
            "How far behind the change each event was when a stream sent it (send time - event time)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
            registry=r,
        )
        self.database_errors = Counter(
            "kara_database_errors",
            "Database errors that failed an RPC, by kind and whether a retry may succeed",
            ["kind", "transient"],
            registry=r,
        )
        self.refusals = Counter(
            "kara_refusals",
            "Requests refused (the caller's to fix, or the state forbids them), by method and reason",
            ["method", "reason"],
            registry=r,
        )
        self.database_full = Gauge(
            "kara_database_full",
            "1 while changes fail because the database's disk is full (DATABASE_FULL); 0 once one commits",
            registry=r,
        )
        self.feed_held_back = Gauge(
            "kara_feed_held_back_seconds",
            "How long a transaction of this PostgreSQL database that outlived --max-transaction-seconds "
            "has held the event feed back (0: none)",
            registry=r,
        )
        self._http: Any = None
        # Labelled children, bound once per (metric, labels): `labels()` costs a lock and a
        # lookup, and every RPC and every committed change moves two or more of them.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children[(metric, labels)] = metric.labels(*labels)
        return child

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self._child(self.rpcs, method, code).inc()
        self._child(self.latency, method).observe(seconds)

    def count(self, tally: Tally) -> None:
        if isinstance(tally, SessionCancelled):
            outcome = "paid" if tally.state is SessionState.CANCELLED_PAID else "voided"
            timing = "late" if tally.late else "on_time"
            self._child(self.cancellations, outcome, timing, tally.cancelled_by.value.lower()).inc()
        elif isinstance(tally, SessionRescheduled):
            outcome = "charged" if tally.charged else "moved"
            timing = "late" if tally.late else "on_time"
            self._child(self.reschedules, outcome, timing, tally.rescheduled_by.value.lower()).inc()
        elif isinstance(tally, CreditsMoved):
            self._child(self.credits, tally.kind.value).inc(tally.credits)
        elif isinstance(tally, NoShowMarked):
            self._child(self.no_shows, "paid" if tally.charged else "voided").inc()
        elif isinstance(tally, ChargeWaived):
            self.waivers.inc()
        elif isinstance(tally, SettledAutomatically):
            self._child(self.settled_automatically, tally.state.value).inc()
        elif isinstance(tally, FeedAppended):
            self._child(self.events_appended, tally.type).inc()
        elif isinstance(tally, InvoiceChanged):
            self._child(self.invoice_actions, tally.action).inc()
            if tally.sessions:
                self._child(self.invoiced_sessions, tally.action).inc(tally.sessions)

    def refusal(self, method: str, reason: str) -> None:
        self._child(self.refusals, method, reason).inc()

    def database_error(self, kind: str, transient: bool) -> None:
        self.database_errors.labels(kind, "true" if transient else "false").inc()

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint; returns the port (useful when `port` is 0)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
