"""Every decision explained (issue 37), through the real gRPC server on SQLite and PostgreSQL.

One named scenario per row of the README's rule tables: the preview's decision (where the change
has a preview), the change's answer, GetSession ("View details") and the change's event all give
the same Decision: the rule, the figures it was decided on and its sentence. A refusal a preview
can predict carries its decision in the status details, the same from the preview and the change."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, timedelta

import pytest
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_client.client import SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.booking import new_programme
from ..support.clock import FakeClock
from ..support.refusals import PRECONDITION, refuse

WINDOW = timedelta(hours=24)
R = pb.DecisionRule


@dataclass(frozen=True)
class Row:
    """A session of a programme on `terms`, starting `starts_in` from now, and what is done to it."""

    rule: int
    act: str
    starts_in: timedelta = timedelta(hours=48)
    terms: dict[str, object] = field(default_factory=dict)
    party: str = "client"
    charge: bool = False
    # The move's new start, from the session's start.
    move_by: timedelta = timedelta(hours=1)
    notice: timedelta | None = None
    sentence: str = ""


ROWS = {
    "client with notice": Row(R.DECISION_RULE_CLIENT_WITH_NOTICE, "cancel", notice=timedelta(hours=48),
                              sentence="Cancelled by the client 48 h before the start; the programme's "
                              "window is 24 h, so the credit was returned."),
    "client late": Row(R.DECISION_RULE_CLIENT_LATE, "cancel", timedelta(hours=20), notice=timedelta(hours=20),
                       sentence="Cancelled by the client 20 h before the start; the programme's window "
                       "is 24 h, so the credit was taken."),
    "client late forgiven": Row(R.DECISION_RULE_LATE_CANCELLATION_FORGIVEN, "cancel", timedelta(hours=20),
                                {"free_late_cancellations": 2}, notice=timedelta(hours=20),
                                sentence="one of the client's 2 free late cancellations (0 used before "
                                "it in 365 days)"),
    "within grace": Row(R.DECISION_RULE_WITHIN_GRACE, "cancel", timedelta(hours=3),
                        {"cancellation_grace": timedelta(hours=1)}, notice=timedelta(hours=3),
                        sentence="within 1 h of booking"),
    "professional with notice": Row(R.DECISION_RULE_PROFESSIONAL_WITH_NOTICE, "cancel", party="professional",
                                    notice=timedelta(hours=48)),
    "professional late charged": Row(R.DECISION_RULE_PROFESSIONAL_LATE_CHARGED, "cancel", timedelta(hours=5),
                                     party="professional", charge=True, notice=timedelta(hours=5),
                                     sentence="with the charge box ticked"),
    "professional late not charged": Row(R.DECISION_RULE_PROFESSIONAL_LATE_NOT_CHARGED, "cancel",
                                         timedelta(hours=5), party="professional", notice=timedelta(hours=5)),
    "charged late move": Row(R.DECISION_RULE_LATE_MOVE_CHARGED, "move", timedelta(hours=6),
                             notice=timedelta(hours=6), sentence="so the move was charged"),
    "move in place": Row(R.DECISION_RULE_MOVED_IN_PLACE, "move", notice=timedelta(hours=48),
                         sentence="so the credit stays held"),
    "free late move": Row(R.DECISION_RULE_MOVED_IN_PLACE, "move", timedelta(hours=6), party="professional",
                          notice=timedelta(hours=6), sentence="and the move was free"),
    "completed": Row(R.DECISION_RULE_COMPLETED, "complete", timedelta(hours=1)),
    "no-show charged": Row(R.DECISION_RULE_NO_SHOW_CHARGED, "no_show", timedelta(hours=1)),
    "no-show not charged": Row(R.DECISION_RULE_NO_SHOW_NOT_CHARGED, "no_show", timedelta(hours=1),
                               {"no_show_takes_credit": False}),
    "no-show forgiven": Row(R.DECISION_RULE_NO_SHOW_FORGIVEN, "no_show", timedelta(hours=1),
                            {"free_late_cancellations": 1}, sentence="free late cancellations"),
    "settled as completed": Row(R.DECISION_RULE_SETTLED_AS_COMPLETED, "settle", timedelta(hours=1),
                                {"settle_unmarked_after": timedelta(hours=12)},
                                sentence="Nobody marked the session within 12 h of its start"),
    "settled as a no-show": Row(R.DECISION_RULE_SETTLED_AS_NO_SHOW, "settle", timedelta(hours=1),
                                {"settle_unmarked_after": timedelta(hours=12), "unmarked_outcome": "no-show"},
                                sentence="a no-show, and the credit was taken"),
}  # fmt: skip


def _decide(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, row: Row, session_id: str
) -> tuple[pb.Decision | None, pb.Session, str]:
    """Previews (where there is a preview) and makes the change; the preview's decision, the
    session the change answered with that holds the decision, and the event type."""
    start = kara.get_session(session_id).starts_at.ToDatetime(UTC)
    if row.act == "cancel":
        preview = kara.preview(session_id, row.party, charge_client=row.charge).decision
        return (
            preview,
            kara.cancel(session_id, row.party, charge_client=row.charge).session,
            "session.cancelled",
        )
    if row.act == "move":
        to = start + row.move_by
        preview = kara.preview_reschedule(session_id, to, row.party, charge_client=row.charge).decision
        done = kara.reschedule(session_id, to, row.party, charge_client=row.charge)
        return preview, done.charged if done.HasField("charged") else done.session, "session.rescheduled"
    clock.advance(row.starts_in + timedelta(minutes=1))
    if row.act == "complete":
        return None, kara.complete(session_id), "session.completed"
    if row.act == "no_show":
        return None, kara.mark_no_show(session_id).session, "session.no_show"
    clock.advance(timedelta(hours=12))
    server.settler.run_once()
    done = kara.get_session(session_id)
    told = "session.no_show" if done.state == pb.SESSION_STATE_NO_SHOW else "session.completed"
    return None, done, told


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_each_rule_is_explained_alike_by_its_preview_its_change_view_details_and_its_event(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, row: Row
) -> None:
    programme_id = new_programme(kara, WINDOW, **row.terms)
    client_id = "c-decisions"
    kara.grant_credits(client_id, 2, programme_id=programme_id)
    session_id = kara.book(
        client_id, "pro-1", clock.now() + row.starts_in, programme_id=programme_id
    ).session_id
    preview, answered, told = _decide(kara, server, clock, row, session_id)
    decision = answered.decision
    assert decision.rule == row.rule, decision
    assert decision.programme_id == programme_id and decision.terms_version == 1
    assert decision.notice_window.ToTimedelta() == WINDOW
    if row.notice is None:
        assert not decision.HasField("notice")
    else:
        assert decision.notice.ToTimedelta() == row.notice
    assert decision.grace_applied == (row.rule == R.DECISION_RULE_WITHIN_GRACE)
    assert decision.forgiveness_allowed == row.terms.get("free_late_cancellations", 0)
    assert decision.forgiveness_used == 0
    assert decision.explanation.endswith(".") and row.sentence in decision.explanation
    if preview is not None:
        assert preview == decision
    assert kara.get_session(answered.session_id).decision == decision
    [event] = [
        e
        for e in kara.list_events(types=[f"kara.sessions.v1.{told}"])
        if e.subject in (answered.session_id, answered.rescheduled_to)
    ]
    changed = event.session_changed
    carried = changed.charged if changed.HasField("charged") else changed.session
    assert carried.decision == decision


def test_a_session_booked_and_never_moved_has_no_decision_yet(kara: SessionsClient, clock: FakeClock) -> None:
    kara.grant_credits("c-undecided", 1)
    session_id = kara.book("c-undecided", "pro-1", clock.now() + timedelta(hours=48)).session_id
    assert not kara.get_session(session_id).HasField("decision")


def test_forgiveness_used_is_what_was_used_before_each_decision(
    kara: SessionsClient, clock: FakeClock
) -> None:
    programme_id = new_programme(
        kara, WINDOW, free_late_cancellations=2, forgiveness_period=timedelta(days=30)
    )
    kara.grant_credits("c-forgiven", 3, programme_id=programme_id)
    sessions = [
        kara.book(
            "c-forgiven", "pro-1", clock.now() + timedelta(hours=2, minutes=i), programme_id=programme_id
        )
        for i in range(3)
    ]
    seen = []
    for session in sessions:
        preview = kara.preview(session.session_id, "client").decision
        decision = kara.cancel(session.session_id, "client").session.decision
        assert preview == decision == kara.get_session(session.session_id).decision
        seen.append((decision.rule, decision.forgiveness_used, decision.forgiveness_allowed))
    forgiven, charged = R.DECISION_RULE_LATE_CANCELLATION_FORGIVEN, R.DECISION_RULE_CLIENT_LATE
    assert seen == [(forgiven, 0, 2), (forgiven, 1, 2), (charged, 2, 2)]


def test_a_waived_charge_keeps_its_decision_and_says_it_was_waived(
    kara: SessionsClient, clock: FakeClock
) -> None:
    kara.grant_credits("c-waived", 1)
    session_id = kara.book("c-waived", "pro-1", clock.now() + timedelta(hours=3)).session_id
    kara.cancel(session_id, "client")
    kara.waive_charge(session_id, "goodwill")
    session = kara.get_session(session_id)
    assert session.decision.rule == R.DECISION_RULE_CLIENT_LATE
    assert session.decision.explanation.endswith(
        f"The charge was waived afterwards by {session.waiver.waived_by}."
    )


@dataclass(frozen=True)
class Refusal:
    rule: int
    reason: str
    act: Callable[[SessionsClient, str, bool], object]
    terms: dict[str, object] = field(default_factory=dict)
    starts_in: timedelta = timedelta(hours=5)


def _cancel(party: str, charge: bool = False) -> Callable[[SessionsClient, str, bool], object]:
    def act(kara: SessionsClient, session_id: str, preview: bool) -> object:
        call = kara.preview if preview else kara.cancel
        return call(session_id, party, charge_client=charge)

    return act


def _move(party: str, charge: bool = False) -> Callable[[SessionsClient, str, bool], object]:
    def act(kara: SessionsClient, session_id: str, preview: bool) -> object:
        to = kara.get_session(session_id).starts_at.ToDatetime(UTC) + timedelta(hours=1)
        call = kara.preview_reschedule if preview else kara.reschedule
        return call(session_id, to, party, charge_client=charge)

    return act


REFUSALS = {
    "charge with notice": Refusal(R.DECISION_RULE_REFUSED_CHARGE_WITH_NOTICE,
                                  "CHARGE_NOT_ALLOWED_WITH_NOTICE", _cancel("professional", True),
                                  starts_in=timedelta(hours=48)),
    "charge the programme forbids": Refusal(R.DECISION_RULE_REFUSED_CHARGE_NOT_ALLOWED,
                                            "CHARGE_NOT_ALLOWED_BY_PROGRAMME", _cancel("professional", True),
                                            {"professional_may_charge_late": False}),
    "contact the professional": Refusal(R.DECISION_RULE_REFUSED_CONTACT_PROFESSIONAL,
                                        "LATE_CANCEL_CONTACT_PROFESSIONAL", _cancel("client"),
                                        {"client_late_cancel": "contact-professional"}),
    "late move refused": Refusal(R.DECISION_RULE_REFUSED_LATE_MOVE, "LATE_RESCHEDULE_NOT_ALLOWED",
                                 _move("client"), {"late_reschedule": "refused"}),
}  # fmt: skip


@pytest.mark.parametrize("refusal", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_refusal_a_preview_predicts_carries_the_same_decision_from_the_preview_and_the_change(
    kara: SessionsClient, server: RunningServer, clock: FakeClock, refusal: Refusal
) -> None:
    programme_id = new_programme(kara, WINDOW, **refusal.terms)
    kara.grant_credits("c-refused", 2, programme_id=programme_id)
    starts = clock.now() + refusal.starts_in
    session_id = kara.book("c-refused", "pro-1", starts, programme_id=programme_id).session_id
    previewed = refuse(server, lambda: refusal.act(kara, session_id, True), PRECONDITION, refusal.reason)
    changed = refuse(server, lambda: refusal.act(kara, session_id, False), PRECONDITION, refusal.reason)
    assert previewed.decision is not None and previewed.decision == changed.decision
    assert previewed.decision.rule == refusal.rule
    assert previewed.decision.notice.ToTimedelta() == refusal.starts_in
    assert previewed.decision.notice_window.ToTimedelta() == WINDOW
    assert previewed.decision.programme_id == programme_id
    assert previewed.decision.explanation == previewed.message


def test_the_move_limit_refusal_carries_its_decision(
    kara: SessionsClient, server: RunningServer, clock: FakeClock
) -> None:
    programme_id = new_programme(kara, WINDOW, max_reschedules=1)
    kara.grant_credits("c-limit", 1, programme_id=programme_id)
    session_id = kara.book(
        "c-limit", "pro-1", clock.now() + timedelta(hours=72), programme_id=programme_id
    ).session_id
    _move("client")(kara, session_id, False)
    refused = refuse(
        server, lambda: _move("client")(kara, session_id, True), PRECONDITION, "RESCHEDULE_LIMIT_REACHED"
    )
    assert refused.decision is not None
    assert refused.decision.rule == R.DECISION_RULE_REFUSED_RESCHEDULE_LIMIT
    assert not refused.decision.HasField("notice")
