"""Every change goes through `Mutations.mutate`: one unit of work per request, idempotent by
request_id, its event in the feed, its tallies to metrics after the commit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from kara_sessions_server.domain.clock import Clock
from kara_sessions_server.domain.errors import (
    AlreadyExists,
    Conflict,
    InvalidRequest,
    PreconditionFailed,
    RecordTooLarge,
    RequestIdReused,
)
from kara_sessions_server.domain.feed import Change
from kara_sessions_server.domain.principal import Principal
from kara_sessions_server.domain.tallies import FeedAppended, Tally
from kara_sessions_server.service_layer.call_context import CURRENT
from kara_sessions_server.service_layer.commit_signal import CommitSignal
from kara_sessions_server.service_layer.fingerprints import fingerprint, legacy_fingerprint
from kara_sessions_server.service_layer.repositories import DuplicateRequestId, RequestRecord, StoredResult
from kara_sessions_server.service_layer.unit_of_work import UnitOfWork, UnitOfWorkFactory

R = TypeVar("R")

# The refusals a replay of a committed request can meet (what it asked for is done already, or
# time has moved on). NOT_FOUND and PERMISSION_DENIED it cannot: nothing is deleted, and the
# caller is the same; those refusals pay no second look.
_REPLAY_MAY_MEET = (PreconditionFailed, InvalidRequest, AlreadyExists)


@dataclass(frozen=True, slots=True)
class Operation(Generic[R]):
    """What `mutate` needs of a use case besides its work: its name and its request (the
    command, whose fields make the request_id's fingerprint), how its result is stored and read
    back, and the event it tells."""

    name: str
    request: object
    dump: Callable[[R], str]
    load: Callable[[str], R]
    event: Callable[[R], Change]


@dataclass
class Mutations:
    unit_of_work: UnitOfWorkFactory
    clock: Clock
    # Told of what committed (metrics); never of a replay or a rollback.
    tell: Callable[[Tally], None] = field(default=lambda tally: None)
    # Wakes the event feed's followers after each commit.
    signal: CommitSignal = field(default_factory=CommitSignal)
    # The most a change's stored result may take (entrypoints/grpc/sizes.py): it is the event's
    # data and the response, as JSON, which is never smaller than their protobuf. None: no bound.
    max_record_bytes: int | None = None

    def mutate(
        self, who: Principal, op: Operation[R], request_id: str, work: Callable[[UnitOfWork, datetime], R]
    ) -> R:
        """Runs `work` once per request_id in one unit of work, storing its result (`op.dump`)
        and the one event that tells the feed of it (`op.event`) in the same transaction; a
        retry gets that result back (`op.load`) and changes nothing, the feed included.

        The happy path reads no stored result first: the event's row is the request_id's record
        and request_id is unique there, so a replay is stopped by the INSERT (or, before it, by
        the work finding its change already made: the session no longer BOOKED, the start since
        passed). Either way the transaction rolls back, and then, only then, the stored result
        is looked up."""
        operation, load = op.name, op.load
        fp = fingerprint(operation, op.request, who)
        try:
            with self.unit_of_work() as uow:
                now = self.clock.now()
                result = work(uow, now)
                data = op.dump(result)
                if self.max_record_bytes is not None and len(data) > self.max_record_bytes:
                    raise _too_large(operation, len(data), self.max_record_bytes)
                told = op.event(result)
                uow.events.append(told, data, now, RequestRecord(request_id, operation, fp))
                uow.tallies.append(FeedAppended(told.type.value))
                uow.commit()
            for tally in uow.tallies:
                self.tell(tally)
            self.signal.notify()
            return result
        except Exception as exc:
            if not isinstance(exc, (*_REPLAY_MAY_MEET, DuplicateRequestId)):
                raise
            # A replay (its change made already: not BOOKED any more, a programme that exists, a
            # start since passed), or a race lost to a request with the same request_id (a retry
            # that overtook its original): if that request committed, its result is ours.
            with self.unit_of_work(write=False) as uow:
                stored = uow.requests.find(request_id)
            if stored is not None:
                replay = load(_same_request(stored, request_id, op, who, fp))
                call = CURRENT.get()
                if call is not None:
                    call.replayed.append(True)
                return replay
            if isinstance(exc, DuplicateRequestId):
                # Recorded by a request that then vanished (its record pruned meanwhile).
                raise Conflict(
                    f"another request with request_id {request_id!r} was being made at the same time; "
                    "retry it",
                    metadata={"request_id": request_id},
                ) from exc
            raise


def _too_large(operation: str, size: int, limit: int) -> RecordTooLarge:
    return RecordTooLarge(
        f"this {operation} would make a record of {size} bytes, more than one message of this server "
        f"carries ({limit} bytes; --max-message-bytes): nothing was changed. Shorten its free text, or "
        "ask the operator to raise --max-message-bytes",
        metadata={"record_bytes": str(size), "max_record_bytes": str(limit)},
    )


def _same_request(stored: StoredResult, request_id: str, op: Operation[R], who: Principal, fp: str) -> str:
    """The stored result, if `request_id` was first used for this very request."""
    same = stored.operation == op.name and (
        stored.fingerprint == fp or stored.fingerprint == legacy_fingerprint(op.name, op.request, who)
    )
    if not same:
        raise RequestIdReused.single(
            "request_id",
            f"{request_id!r} was already used for a {stored.operation} request with other parameters "
            "or by another caller; use a new request_id for a new request",
        )
    return stored.result
