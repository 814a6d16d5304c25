"""A lifecycle as data, and firing an event of its shared `transitions` Machine on one model.

A Lifecycle is the transition table a reader checks against the article; the server's Machine
and the diagram in docs/lifecycle.md (`make docs`) are both built from it. Each lifecycle builds
its Machine once at import. An event is fired on a model the Machine does not hold: attaching one
per request (add_model/remove_model, under a lock, since they change the Machine's model list)
cost more than the transition itself (BENCHMARKS.md)."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transitions import Machine, MachineError


@dataclass(frozen=True)
class Lifecycle:
    """States, the transition table and the model class whose methods are the guards (their
    docstrings say what each checks). For one trigger, the first transition whose guards pass
    wins, so the order of `transitions` matters."""

    name: str
    states: type[enum.Enum]
    initial: enum.Enum
    transitions: list[dict[str, Any]]
    model: type
    # A model method run once per event before any guard (it may refuse the event).
    prepare_event: str | None = None


def shared_machine(lifecycle: Lifecycle) -> Machine:
    """A Machine with no model of its own, for `fire`: guards get the EventData (send_event)
    and only the listed transitions exist (no auto `to_<state>` triggers)."""
    return Machine(
        model=None,
        states=list(lifecycle.states),
        transitions=lifecycle.transitions,
        initial=None,
        auto_transitions=False,
        send_event=True,
        model_attribute="state",
        prepare_event=lifecycle.prepare_event,
    )


def fire(
    machine: Machine,
    model: Any,
    state: str,
    trigger: str,
    refusal: Callable[[], Exception],
    **kwargs: Any,
) -> bool:
    """Fires `trigger` on `model`, which starts in `state`; True if a transition ran (its guards
    passed), and the model then holds its new state. If no transition of `trigger` leaves
    `state`, raises `refusal()` (the domain's error for that).

    This is what the trigger method add_model would bind does (`Event.trigger`, partial on the
    model), without registering the model: the Machine is only read, so threads may fire on
    their own models at once (it has no queue: `queued` is off)."""
    setattr(model, machine.model_attribute, state)
    try:
        return bool(machine.events[trigger].trigger(model, **kwargs))
    except MachineError as exc:
        raise refusal() from exc
