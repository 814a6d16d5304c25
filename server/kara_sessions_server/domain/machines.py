"""A lifecycle as data, and driving its shared `transitions` Machine for one event.

A Lifecycle is the transition table a reader checks against the article; the server's Machine
and the diagram in docs/lifecycle.md (`make docs`) are both built from it. Each lifecycle builds
its Machine once at import and attaches a model for one event at a time (building a Machine per
request costs about three times as much). add_model/remove_model mutate the machine's model
list, so they are serialised across the server's threads."""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from transitions import Machine

_ATTACH_LOCK = threading.Lock()


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
    """A Machine with no model of its own, for `attached`: guards get the EventData (send_event)
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


@contextmanager
def attached(machine: Machine, model: Any, state: str) -> Iterator[Any]:
    """`model`, attached to `machine` in `state` for the duration of the block."""
    with _ATTACH_LOCK:
        machine.add_model(model, initial=state)
    try:
        yield model
    finally:
        with _ATTACH_LOCK:
            machine.remove_model(model)
