"""Reading the event feed (EventService): a page after a cursor, following it as changes commit,
and pruning what is older than the retention period. Appending is `Mutations.mutate`'s, in the
transaction of each change."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

from kara_sessions_server.domain.clock import Clock
from kara_sessions_server.domain.feed import EventType, FeedData, FeedEvent, SessionChanged
from kara_sessions_server.domain.model import Payment, Session
from kara_sessions_server.domain.principal import Principal
from kara_sessions_server.service_layer import authz, snapshots
from kara_sessions_server.service_layer.commit_signal import CommitSignal
from kara_sessions_server.service_layer.pagination import MAX_PAGE_SIZE
from kara_sessions_server.service_layer.repositories import decode_cursor
from kara_sessions_server.service_layer.unit_of_work import UnitOfWorkFactory

# Events are small: a bigger default page than the other lists' (pagination.MAX_PAGE_SIZE caps it).
DEFAULT_PAGE_SIZE = 100
# Each batch of pruning is its own short transaction, so it never holds writers up for long.
PRUNE_BATCH = 500


def _session_changed(session: Session) -> SessionChanged:
    return SessionChanged(session, Payment.of(session))


def _settled(raw: str) -> SessionChanged:
    return SessionChanged(*snapshots.load_settlement(raw))


def _rescheduled(raw: str) -> SessionChanged:
    done = snapshots.load_rescheduled(raw)
    charged = done.charged
    return SessionChanged(
        done.session, Payment.of(done.session), charged, None if charged is None else Payment.of(charged)
    )


# The stored data is what the request_id record stores for the same request (snapshots.py).
_LOAD: dict[EventType, Callable[[str], FeedData]] = {
    EventType.SESSION_BOOKED: lambda raw: _session_changed(snapshots.load_session(raw)),
    EventType.SESSION_COMPLETED: lambda raw: _session_changed(snapshots.load_session(raw)),
    EventType.SESSION_CANCELLED: _settled,
    EventType.SESSION_NO_SHOW: _settled,
    EventType.SESSION_CHARGE_WAIVED: _settled,
    EventType.SESSION_RESCHEDULED: _rescheduled,
    EventType.CREDITS_GRANTED: snapshots.load_account,
    EventType.CREDITS_EXPIRED: snapshots.load_account,
    EventType.INVOICE_CREATED: snapshots.load_invoice,
    EventType.INVOICE_CHANGED: snapshots.load_invoice,
    EventType.INVOICE_SUBMITTED: snapshots.load_invoice,
    EventType.PROGRAMME_CREATED: snapshots.load_programme,
    EventType.PROGRAMME_UPDATED: snapshots.load_programme,
}
# An event type the feed cannot read would fail ListEvents at the first such event: fail here.
if set(_LOAD) != set(EventType):
    raise ImportError(f"the feed reads no data of {sorted(set(EventType) - set(_LOAD))}")


@dataclass
class EventServices:
    unit_of_work: UnitOfWorkFactory
    clock: Clock
    # Wakes followers when a change commits in this process.
    signal: CommitSignal
    # Events older than this are pruned (Settings.event_retention).
    retention: timedelta
    # An event's row is also its change's request_id record: kept at least this long too
    # (Settings.request_id_retention).
    request_ids: timedelta
    # How often a follower looks for commits made by other server processes.
    poll_seconds: float = 0.5

    def list_events(
        self, who: Principal, after: str, size: int, types: Sequence[EventType]
    ) -> list[FeedEvent]:
        cursor = decode_cursor(after)
        professional_id, client_id = authz.feed_scope(who)
        with self.unit_of_work(write=False) as uow:
            stored = uow.events.read(cursor, size, types, professional_id, client_id)
        return [
            FeedEvent(s.event_id, s.cursor.encode(), s.type, s.subject, s.time, _LOAD[s.type](s.data))
            for s in stored
        ]

    def follow(
        self, who: Principal, after: str, types: Sequence[EventType], keep_going: Callable[[], bool]
    ) -> Iterator[FeedEvent]:
        """The events after `after`, then each new one as it commits, while `keep_going()`."""
        cursor = after
        while keep_going():
            seen = self.signal.commits
            page = self.list_events(who, cursor, MAX_PAGE_SIZE, types)
            for event in page:
                yield event
                cursor = event.cursor
            if len(page) < MAX_PAGE_SIZE:
                self.signal.wait(seen, self.poll_seconds)

    def wake_followers(self) -> None:
        """Makes every follower look again now (a caller hung up, or the server is stopping)."""
        self.signal.notify()

    def prune(self) -> int:
        """Deletes the events older than the retention period, a batch per transaction."""
        total = 0
        while True:
            with self.unit_of_work() as uow:
                now = self.clock.now()
                deleted = uow.events.prune(now - self.retention, now - self.request_ids, PRUNE_BATCH, now)
                uow.commit()
            total += deleted
            if deleted < PRUNE_BATCH:
                return total
