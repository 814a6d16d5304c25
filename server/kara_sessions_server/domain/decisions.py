"""Why a session's credit went where it went: the rule of the README's tables that decided it,
the figures it was decided on, and one plain sentence for the workstation (issue 37).

A decision is drawn from what its change recorded on the session: who, the notice, the charge
box, the grace, a forgiveness, a settlement, the terms version it was booked under (and so the
window), and how many of the client's charges were already forgiven when it was decided
(`Session.forgiveness_used`, the one figure nothing else keeps). So a preview, which decides on
the session it would record, and the change itself give the same decision, and GetSession and
the change's event give it again from the stored session. A refusal a preview can predict
carries its decision on the error (`DomainError.decision`)."""

from __future__ import annotations

import enum
import string
from collections.abc import Callable
from datetime import timedelta
from typing import NamedTuple

from kara_sessions_server.domain.model import Party, Session, SessionState


class DecisionRule(enum.StrEnum):
    """One value per row of the README's rule tables (cancellations, moves, no-shows, settlement),
    and the refusals a preview can predict."""

    CLIENT_WITH_NOTICE = "CLIENT_WITH_NOTICE"
    CLIENT_LATE = "CLIENT_LATE"
    # A late cancellation that would have been charged (the client's, or the box ticked), voided
    # as one of the client's free late cancellations.
    LATE_CANCELLATION_FORGIVEN = "LATE_CANCELLATION_FORGIVEN"
    # The client's, with less notice than the window, within the grace after booking.
    WITHIN_GRACE = "WITHIN_GRACE"
    PROFESSIONAL_WITH_NOTICE = "PROFESSIONAL_WITH_NOTICE"
    PROFESSIONAL_LATE_CHARGED = "PROFESSIONAL_LATE_CHARGED"
    PROFESSIONAL_LATE_NOT_CHARGED = "PROFESSIONAL_LATE_NOT_CHARGED"
    LATE_MOVE_CHARGED = "LATE_MOVE_CHARGED"
    MOVED_IN_PLACE = "MOVED_IN_PLACE"
    COMPLETED = "COMPLETED"
    NO_SHOW_CHARGED = "NO_SHOW_CHARGED"
    NO_SHOW_NOT_CHARGED = "NO_SHOW_NOT_CHARGED"
    NO_SHOW_FORGIVEN = "NO_SHOW_FORGIVEN"
    SETTLED_AS_COMPLETED = "SETTLED_AS_COMPLETED"
    SETTLED_AS_NO_SHOW = "SETTLED_AS_NO_SHOW"
    REFUSED_CHARGE_WITH_NOTICE = "REFUSED_CHARGE_WITH_NOTICE"
    REFUSED_CHARGE_NOT_ALLOWED = "REFUSED_CHARGE_NOT_ALLOWED"
    REFUSED_CONTACT_PROFESSIONAL = "REFUSED_CONTACT_PROFESSIONAL"
    REFUSED_LATE_MOVE = "REFUSED_LATE_MOVE"
    REFUSED_RESCHEDULE_LIMIT = "REFUSED_RESCHEDULE_LIMIT"


# The rules a cancellation's record decides between (a charged move's is LATE_MOVE_CHARGED).
CANCELLATION_RULES = frozenset(
    {
        DecisionRule.CLIENT_WITH_NOTICE,
        DecisionRule.CLIENT_LATE,
        DecisionRule.LATE_CANCELLATION_FORGIVEN,
        DecisionRule.WITHIN_GRACE,
        DecisionRule.PROFESSIONAL_WITH_NOTICE,
        DecisionRule.PROFESSIONAL_LATE_CHARGED,
        DecisionRule.PROFESSIONAL_LATE_NOT_CHARGED,
    }
)


class Decision(NamedTuple):
    rule: DecisionRule
    # The notice given (a cancellation's or move's); None where notice played no part.
    notice: timedelta | None
    notice_window: timedelta
    grace_applied: bool
    # How many of the client's charges were forgiven within the period before this one, and how
    # many the terms allow (0 and 0 where the terms forgive none).
    forgiveness_used: int
    forgiveness_allowed: int
    programme_id: str
    terms_version: int
    explanation: str


def cancellation_rule(
    *, by_client: bool, late: bool, within_grace: bool, charged: bool, forgiven: bool
) -> DecisionRule:
    """The row of the cancellation table a cancellation's recorded facts fall on (`charged`: the
    client's late one, or the box ticked; `forgiven`: voided all the same)."""
    if forgiven:
        return DecisionRule.LATE_CANCELLATION_FORGIVEN
    if within_grace:
        return DecisionRule.WITHIN_GRACE
    if by_client:
        return DecisionRule.CLIENT_LATE if late else DecisionRule.CLIENT_WITH_NOTICE
    if not late:
        return DecisionRule.PROFESSIONAL_WITH_NOTICE
    return DecisionRule.PROFESSIONAL_LATE_CHARGED if charged else DecisionRule.PROFESSIONAL_LATE_NOT_CHARGED


_CANCELLED = (SessionState.CANCELLED_PAID, SessionState.CANCELLED_VOIDED)


def rule_of(session: Session) -> DecisionRule | None:
    """The rule that decided where `session`'s credit is now, from what its changes recorded; None
    while nothing has been decided (booked, never moved)."""
    state = session.state
    c = session.cancellation
    if c is not None and state in _CANCELLED:
        if session.rescheduled_to:
            return DecisionRule.LATE_MOVE_CHARGED
        by_client = c.cancelled_by is Party.CLIENT
        return cancellation_rule(
            by_client=by_client,
            late=c.late,
            within_grace=c.within_grace,
            charged=by_client or c.charge_client,
            forgiven=c.forgiven,
        )
    if state is SessionState.COMPLETED:
        return DecisionRule.SETTLED_AS_COMPLETED if session.settled_automatically else DecisionRule.COMPLETED
    if state is SessionState.NO_SHOW:
        if session.settled_automatically:
            return DecisionRule.SETTLED_AS_NO_SHOW
        if session.no_show_forgiven:
            return DecisionRule.NO_SHOW_FORGIVEN
        return (
            DecisionRule.NO_SHOW_CHARGED
            if session.terms.no_show_takes_credit
            else DecisionRule.NO_SHOW_NOT_CHARGED
        )
    if state is SessionState.BOOKED and session.moves:
        return DecisionRule.MOVED_IN_PLACE
    return None


def decision_of(session: Session) -> Decision | None:
    """The decision behind `session`'s latest change of its credit (None: none yet)."""
    rule = rule_of(session)
    if rule is None:
        return None
    terms = session.terms
    notice, grace = None, False
    if session.cancellation is not None and (
        rule in CANCELLATION_RULES or rule is DecisionRule.LATE_MOVE_CHARGED
    ):
        notice, grace = session.cancellation.notice, session.cancellation.within_grace
    elif rule is DecisionRule.MOVED_IN_PLACE:
        notice, grace = session.moves[-1].notice, session.moves[-1].within_grace
    allowed = terms.free_late_cancellations
    return Decision(
        rule=rule,
        notice=notice,
        notice_window=terms.notice_window,
        grace_applied=grace,
        forgiveness_used=session.forgiveness_used,
        forgiveness_allowed=allowed,
        programme_id=session.programme_id,
        terms_version=session.terms_version,
        explanation=_explain(rule, session, notice) + _waived(session),
    )


def _waived(session: Session) -> str:
    w = session.waiver
    return f" The charge was waived afterwards by {w.waived_by}." if w is not None else ""


def refused(
    rule: DecisionRule, session: Session, notice: timedelta | None, grace: bool, why: str
) -> Decision:
    """The decision behind a refusal the policy makes of `session` (its message is the sentence)."""
    return Decision(
        rule=rule,
        notice=notice,
        notice_window=session.terms.notice_window,
        grace_applied=grace,
        forgiveness_used=0,
        forgiveness_allowed=session.terms.free_late_cancellations,
        programme_id=session.programme_id,
        terms_version=session.terms_version,
        explanation=why,
    )


def hours(delta: timedelta) -> str:
    """A duration as people read it on the workstation: whole or to the hundredth of an hour,
    rounded down, so 23 h 59 min 59 s is never shown as a window's 24 h."""
    hundredths = delta // _HUNDREDTH_OF_AN_HOUR
    if hundredths % 100 == 0:
        return f"{hundredths // 100} h"
    return f"{hundredths / 100:g} h"


_HUNDREDTH_OF_AN_HOUR = timedelta(seconds=36)


# Each rule's sentence; the fields are filled in by _explain from the decided session.
_SENTENCES = {
    DecisionRule.CLIENT_WITH_NOTICE: (
        "Cancelled by the client {before}; {window}, so the credit was returned."
    ),
    DecisionRule.CLIENT_LATE: "Cancelled by the client {before}; {window}, so the credit was taken.",
    DecisionRule.LATE_CANCELLATION_FORGIVEN: (
        "Cancelled by {who} {before}; {window}, so it would have been charged, but {forgiven}."
    ),
    DecisionRule.WITHIN_GRACE: (
        "Cancelled by the client {before}, less than the window, but within {grace} of booking (the "
        "programme's grace), so the credit was returned."
    ),
    DecisionRule.PROFESSIONAL_WITH_NOTICE: (
        "Cancelled by the professional {before}; {window}, so the credit was returned."
    ),
    DecisionRule.PROFESSIONAL_LATE_CHARGED: (
        "Cancelled by the professional {before} with the charge box ticked; {window}, so the credit "
        "was taken."
    ),
    DecisionRule.PROFESSIONAL_LATE_NOT_CHARGED: (
        "Cancelled by the professional {before} with the charge box clear; {window}, so the credit "
        "was returned."
    ),
    DecisionRule.LATE_MOVE_CHARGED: (
        "Moved {before}; {window}, so the move was charged: the credit was taken and the session "
        "booked again on a new credit."
    ),
    DecisionRule.MOVED_IN_PLACE: "Moved {before}; {window}, {free}so the credit stays held.",
    DecisionRule.COMPLETED: "Marked as completed, so the credit was taken.",
    DecisionRule.NO_SHOW_CHARGED: (
        "Marked as a no-show; the programme charges a no-show, so the credit was taken."
    ),
    DecisionRule.NO_SHOW_NOT_CHARGED: (
        "Marked as a no-show; the programme does not charge a no-show, so the credit was returned."
    ),
    DecisionRule.NO_SHOW_FORGIVEN: "Marked as a no-show, which the programme charges, but {forgiven}.",
    DecisionRule.SETTLED_AS_COMPLETED: "{settled} completed, and the credit was taken.",
    DecisionRule.SETTLED_AS_NO_SHOW: "{settled} a no-show, {no_show}.",
}


def _forgiven(session: Session, notice: timedelta | None) -> str:
    terms = session.terms
    return (
        f"it was forgiven as one of the client's {terms.free_late_cancellations} free late "
        f"cancellations ({session.forgiveness_used} used before it in "
        f"{terms.forgiveness_period.days} days), so the credit was returned"
    )


def _no_show(session: Session, notice: timedelta | None) -> str:
    if session.no_show_forgiven:
        return f"which the programme charges, but {_forgiven(session, notice)}"
    return f"and the credit was {'taken' if session.terms.no_show_takes_credit else 'returned'}"


def _by_whom(session: Session, notice: timedelta | None) -> str:
    c = session.cancellation
    return (
        "the client" if c and c.cancelled_by.value == "CLIENT" else "the professional (the charge box ticked)"
    )


# What fills each field of the sentences, from the decided session and the notice it gave.
_PIECES: dict[str, Callable[[Session, timedelta | None], str]] = {
    "before": lambda s, notice: f"{hours(notice)} before the start" if notice is not None else "",
    "window": lambda s, notice: f"the programme's window is {hours(s.terms.notice_window)}",
    "who": _by_whom,
    "forgiven": _forgiven,
    "grace": lambda s, notice: hours(s.terms.cancellation_grace),
    "free": lambda s, notice: (
        "and the move was free, " if notice is not None and notice < s.terms.notice_window else ""
    ),
    "settled": lambda s, notice: (
        f"Nobody marked the session within {hours(s.terms.settle_unmarked_after)} of its start, so "
        "the server settled it as the programme's terms say:"
    ),
    "no_show": _no_show,
}
# Each sentence's fields, so a decision fills only those its rule names (it runs on every session
# a response carries).
_FIELDS = {
    rule: tuple(name for _, name, _, _ in string.Formatter().parse(sentence) if name)
    for rule, sentence in _SENTENCES.items()
}


def _explain(rule: DecisionRule, session: Session, notice: timedelta | None) -> str:
    sentence = _SENTENCES[rule]
    fields = _FIELDS[rule]
    if not fields:
        return sentence
    return sentence.format_map({name: _PIECES[name](session, notice) for name in fields})
