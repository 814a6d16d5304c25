"""`serve --cpus`: keep each server process on the CPUs it is given.

CPython runs one thread's Python at a time, so a server process uses about one core however
many it may run on; on several, its threads hand the interpreter lock and each call to one
another across CPUs, and on a VM every such wake-up is an interrupt between virtual CPUs.
Measured (BENCHMARKS.md, issue 15): on one CPU the same server spends a quarter less CPU per
cancellation and half as much per read. Linux only; off by default, since a CPU the operator
did not reserve may be busy with something the kernel can then no longer move the server from."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection
from pathlib import Path

log = logging.getLogger("kara_sessions_server")


def parse(text: str) -> tuple[int, ...]:
    """`2`, `2,3` or `0-3` (a list of numbers and ranges, as taskset and cpusets write them),
    in the order given; each must be a CPU this process may run on. Raises ValueError."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpus needs Linux (sched_setaffinity)")
    cpus: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            span = range(int(first), int(last if dash else first) + 1)
        except ValueError:
            span = range(0)
        if not span:
            raise ValueError(f"--cpus lists CPU numbers and ranges (2 or 2,3 or 0-3), not {text!r}")
        cpus += [cpu for cpu in span if cpu not in cpus]
    allowed = os.sched_getaffinity(0)
    if not set(cpus) <= allowed:
        raise ValueError(f"--cpus {text}: this process may run on CPUs {_listed(allowed)} only")
    return tuple(cpus)


def pin(cpus: Collection[int]) -> None:
    """Keeps every thread of this process, and so every thread they start, on `cpus`."""
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(int(task.name), cpus)
    log.info("kara-sessions: pinned to CPU %s", _listed(cpus))


def _listed(cpus: Collection[int]) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))
