"""The application: every use case, wired to one unit-of-work factory and one clock, with the
limits the settings give them. `build_application` is the one place that wiring is written;
the server (grpc/server.py's `start`), `serve --processes`' preparation, the benchmark and the
in-memory service tests all build it here, each with its own unit of work (SQL or in memory)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kara_sessions_server.domain.clock import Clock
from kara_sessions_server.domain.policy import NoticePolicy
from kara_sessions_server.domain.tallies import Tally
from kara_sessions_server.entrypoints.grpc import sizes
from kara_sessions_server.entrypoints.settings import Settings
from kara_sessions_server.service_layer.feed import EventServices
from kara_sessions_server.service_layer.invoice_services import InvoiceServices
from kara_sessions_server.service_layer.mutations import Mutations
from kara_sessions_server.service_layer.programme_reports import ProgrammeReports
from kara_sessions_server.service_layer.programme_services import ProgrammeServices
from kara_sessions_server.service_layer.services import Services
from kara_sessions_server.service_layer.unit_of_work import UnitOfWorkFactory


@dataclass(frozen=True, slots=True)
class Application:
    # How every change is made (one unit of work, its event, its request_id's record).
    mutations: Mutations
    # Sessions, payments and credits.
    sessions: Services
    programmes: ProgrammeServices
    # A programme's usage and simulations (its sponsor's view).
    reports: ProgrammeReports
    invoices: InvoiceServices
    events: EventServices


def build_application(
    settings: Settings,
    unit_of_work: UnitOfWorkFactory,
    clock: Clock,
    tell: Callable[[Tally], None] | None = None,
) -> Application:
    """The use cases as `settings` configure them. `tell` hears of what committed (the
    server's metrics); nothing is written here: `programmes.ensure_default` creates the default
    programme when a database is first served."""
    mutations = Mutations(
        unit_of_work,
        clock,
        tell=tell or _told_nobody,
        max_record_bytes=sizes.record_bytes(settings.max_message_bytes),
    )
    return Application(
        mutations=mutations,
        sessions=Services(unit_of_work, clock, mutations, settings.max_booking_horizon, NoticePolicy()),
        programmes=ProgrammeServices(unit_of_work, clock, mutations),
        reports=ProgrammeReports(unit_of_work, settings.report_min_count),
        invoices=InvoiceServices(unit_of_work, mutations),
        events=EventServices(
            unit_of_work,
            clock,
            mutations.signal,
            retention=settings.event_retention,
            request_ids=settings.request_id_retention,
        ),
    )


def _told_nobody(tally: Tally) -> None:
    """Where tallies go without metrics to count them."""
