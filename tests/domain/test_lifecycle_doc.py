"""docs/lifecycle.md is drawn from the transition tables the server runs, and stays so."""

from __future__ import annotations

from pathlib import Path

import pytest

from kara_sessions_server.domain import invoice_lifecycle, session_lifecycle
from kara_sessions_server.domain.machines import Lifecycle
from kara_sessions_server.entrypoints import lifecycle_doc

DOC = Path(__file__).resolve().parents[2] / "docs" / "lifecycle.md"


def test_the_committed_diagram_is_what_the_tables_draw() -> None:
    assert DOC.read_text(encoding="utf-8") == lifecycle_doc.render(), (
        "docs/lifecycle.md differs from the transition tables: run `make docs` and commit it"
    )


@pytest.mark.parametrize(
    ("lifecycle", "machine"),
    [
        (session_lifecycle.SESSION_LIFECYCLE, session_lifecycle._MACHINE),
        (invoice_lifecycle.INVOICE_LIFECYCLE, invoice_lifecycle._MACHINE),
    ],
    ids=["session", "invoice"],
)
def test_the_server_runs_exactly_the_drawn_table(lifecycle: Lifecycle, machine: object) -> None:
    """What the doc draws is what the Machine does: the same transitions, guards (which must pass
    and which must not), in order."""
    ran = [
        (trigger, t.source, t.dest, [(c.func, c.target) for c in t.conditions])
        for trigger, event in machine.events.items()  # type: ignore[attr-defined]
        for source in event.transitions
        for t in event.transitions[source]
    ]
    table = [
        (
            t["trigger"],
            source.value,
            t["dest"].value if t["dest"] is not None else None,
            [(c, True) for c in t.get("conditions", [])] + [(u, False) for u in t.get("unless", [])],
        )
        for t in lifecycle.transitions
        for source in (t["source"] if isinstance(t["source"], list) else [t["source"]])
    ]
    assert ran == table


def test_every_guard_says_what_it_checks() -> None:
    """The doc's tables quote each guard's docstring; an undocumented guard would read as blank."""
    for lifecycle in (session_lifecycle.SESSION_LIFECYCLE, invoice_lifecycle.INVOICE_LIFECYCLE):
        for t in lifecycle.transitions:
            for guard in t.get("conditions", []):
                assert getattr(lifecycle.model, guard).__doc__, f"{lifecycle.name}.{guard} has no docstring"


def test_the_diagram_shows_every_transition_with_its_guards() -> None:
    drawn = lifecycle_doc.mermaid(session_lifecycle.SESSION_LIFECYCLE)
    assert "BOOKED --> CANCELLED_PAID: cancel [client_pays & !forgiven]" in drawn
    assert "BOOKED --> CANCELLED_VOIDED: cancel" in drawn
    assert "BOOKED --> COMPLETED: complete [has_started]" in drawn
    invoice = lifecycle_doc.mermaid(invoice_lifecycle.INVOICE_LIFECYCLE)
    assert "DRAFT --> SUBMITTED: submit [has_lines]" in invoice
