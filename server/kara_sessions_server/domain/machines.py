"""Driving a shared `transitions` Machine for one event.

Each lifecycle builds its Machine once at import and attaches a model for one event at a time
(building a Machine per request costs about three times as much). add_model/remove_model mutate
the machine's model list, so they are serialised across the server's threads."""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from transitions import Machine

_ATTACH_LOCK = threading.Lock()


def shared_machine(states: type[enum.Enum], transitions: list[dict[str, Any]], **options: Any) -> Machine:
    """A Machine with no model of its own, for `attached`: guards get the EventData (send_event)
    and only the listed transitions exist (no auto `to_<state>` triggers)."""
    return Machine(
        model=None,
        states=list(states),
        transitions=transitions,
        initial=None,
        auto_transitions=False,
        send_event=True,
        model_attribute="state",
        **options,
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
