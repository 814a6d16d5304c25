"""Programme use cases: create, read, list and update a programme's terms (a service's job), and
making sure the default programme exists when the server starts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from kara_sessions_server.domain import programme as programmes
from kara_sessions_server.domain.clock import Clock
from kara_sessions_server.domain.errors import Conflict
from kara_sessions_server.domain.feed import Change, EventType
from kara_sessions_server.domain.model import CreateProgramme, Page, UpdateProgramme
from kara_sessions_server.domain.principal import Principal
from kara_sessions_server.domain.programme import Programme
from kara_sessions_server.service_layer import authz, snapshots
from kara_sessions_server.service_layer.mutations import Mutations, Operation
from kara_sessions_server.service_layer.unit_of_work import UnitOfWork, UnitOfWorkFactory

log = logging.getLogger("kara_sessions_server")


@dataclass
class ProgrammeServices:
    unit_of_work: UnitOfWorkFactory
    clock: Clock
    mutations: Mutations

    def create_programme(self, who: Principal, cmd: CreateProgramme) -> Programme:
        authz.check_manage_programmes(who)
        programmes.check(cmd.programme_id, cmd.display_name, cmd.terms)

        def work(uow: UnitOfWork, now: datetime) -> Programme:
            created = Programme(cmd.programme_id, cmd.display_name, cmd.terms, created_at=now, updated_at=now)
            uow.programmes.create(created)
            return created

        return self._mutate(who, "CreateProgramme", cmd, work, EventType.PROGRAMME_CREATED)

    def update_programme(self, who: Principal, cmd: UpdateProgramme) -> Programme:
        authz.check_manage_programmes(who)

        def work(uow: UnitOfWork, now: datetime) -> Programme:
            # Locked as it is read: concurrent updates without an etag queue here and each
            # applies to the one before it, instead of all but one losing the race.
            before = uow.programmes.get(cmd.programme_id, for_change=True)
            if cmd.etag and cmd.etag != before.etag:
                raise Conflict(
                    f"programme {cmd.programme_id!r} is at etag {before.etag}, not {cmd.etag}: another "
                    "change came first; read it again, or update without an etag",
                    reason="ETAG_MISMATCH",
                    metadata={"programme_id": cmd.programme_id, "etag": before.etag},
                )
            after = before.changed(cmd.changes, now)
            uow.programmes.change(before, after)
            return after

        return self._mutate(who, "UpdateProgramme", cmd, work, EventType.PROGRAMME_UPDATED)

    def get_programme(self, who: Principal, programme_id: str) -> Programme:
        authz.check_programme(who, programme_id)
        with self.unit_of_work(write=False) as uow:
            return uow.programmes.get(programme_id)

    def list_programmes(self, who: Principal, size: int, token: str) -> Page[Programme]:
        with self.unit_of_work(write=False) as uow:
            return uow.programmes.page(size, token)

    def ensure_default(self, notice_window: timedelta) -> Programme:
        """Creates the default programme with `notice_window` unless it exists; says so when the
        stored window differs (it is changed with UpdateProgramme, not by a flag)."""
        with self.unit_of_work(write=False) as uow:
            default = uow.programmes.find(programmes.DEFAULT_PROGRAMME_ID)
        if default is None:
            # Written only when missing, so a read-only database still serves its reads.
            with self.unit_of_work() as uow:
                uow.programmes.add(programmes.default_programme(self.clock.now(), notice_window))
                default = uow.programmes.get(programmes.DEFAULT_PROGRAMME_ID)
                uow.commit()
        if default.terms.notice_window != notice_window:
            log.warning(
                "the default programme's notice window is %s, not the %s of --notice-window-hours: the "
                "flag only sets it when the default programme is first created; change it with "
                "UpdateProgramme (kara-sessions programme update default --notice-window-hours H)",
                default.terms.notice_window,
                notice_window,
            )
        return default

    def _mutate(
        self,
        who: Principal,
        operation: str,
        cmd: CreateProgramme | UpdateProgramme,
        work: Work,
        told: EventType,
    ) -> Programme:
        op = Operation(
            operation,
            cmd,
            snapshots.dump_programme,
            snapshots.load_programme,
            lambda programme: Change.of_programme(told, programme),
        )
        return self.mutations.mutate(who, op, cmd.request_id, work)


Work = Callable[[UnitOfWork, datetime], Programme]
