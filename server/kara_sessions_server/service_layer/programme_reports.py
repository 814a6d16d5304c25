"""A programme's report and its simulations (issue 37): what happened under it in a period, and
what other terms would have decided of it, for a service (exact) or the programme's sponsor
(small numbers protected: domain/usage.py says how). Each is one read-only unit of work; a
simulation writes nothing and appends no event."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from kara_sessions_server.domain import usage
from kara_sessions_server.domain.principal import Principal
from kara_sessions_server.domain.programme import ProgrammeChanges
from kara_sessions_server.domain.usage import Count, Report, Usage
from kara_sessions_server.service_layer import authz
from kara_sessions_server.service_layer.unit_of_work import UnitOfWork, UnitOfWorkFactory


@dataclass(frozen=True, slots=True)
class SimulatedReport:
    current: Report
    proposed: Report
    changed: Count
    refused: Count


@dataclass
class ProgrammeReports:
    unit_of_work: UnitOfWorkFactory
    # A sponsor's k: counts below it are suppressed, others rounded down to a multiple of it.
    min_count: int

    def usage(self, who: Principal, programme_id: str, start: datetime, end: datetime) -> Report:
        bounds, k = self._period(who, programme_id, start, end)
        with self.unit_of_work(write=False) as uow:
            uow.programmes.get(programme_id)
            per_month, distinct = self._counts(uow, programme_id, bounds)
        return usage.report(per_month, distinct, k)

    def simulate(
        self, who: Principal, programme_id: str, start: datetime, end: datetime, changes: ProgrammeChanges
    ) -> SimulatedReport:
        bounds, k = self._period(who, programme_id, start, end)
        with self.unit_of_work(write=False) as uow:
            programme = uow.programmes.get(programme_id)
            terms = programme.proposed(changes, named="terms")
            per_month, distinct = self._counts(uow, programme_id, bounds)
            since = _before(start, terms.forgiveness_period)
            forgiven = uow.reports.records(programme_id, since, start, forgiven_only=True)
            records = uow.reports.records(programme_id, start, end)
        # Replayed once the transaction is over: it reads, and holds nothing while it thinks.
        lookback = usage.decided(forgiven, since, start)
        simulation = usage.simulate(per_month, lookback, usage.decided(records, start, end), bounds, terms)
        return SimulatedReport(
            usage.report(per_month, distinct, k),
            usage.report(simulation.proposed, distinct, k),
            usage.total(simulation.changed, k),
            usage.total(simulation.refused, k),
        )

    def _period(
        self, who: Principal, programme_id: str, start: datetime, end: datetime
    ) -> tuple[list[datetime], int]:
        """The period's bounds (a sponsor's: month by month) and the k its counts are shown with."""
        authz.check_programme_report(who, programme_id)
        usage.check_period(start, end)
        if who.is_service:
            return [start, end], 1
        return usage.months(start, end), self.min_count

    @staticmethod
    def _counts(uow: UnitOfWork, programme_id: str, bounds: list[datetime]) -> tuple[list[Usage], int]:
        """Each month's counts, and the period's distinct clients (not a sum of months')."""
        per_month = uow.reports.usage(programme_id, bounds)
        return per_month, uow.reports.distinct_clients(programme_id, bounds[0], bounds[-1])


def _before(at: datetime, period: timedelta) -> datetime:
    """`period` before `at`, or the first instant there is (a period starting in year 1)."""
    try:
        return at - period
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC)
