"""N calls run as a server's worker runs them, in one process, for `valgrind --tool=callgrind`:
it counts instructions, so the figure is the same from run to run on a busy shared machine,
where timings vary by a quarter. SQLite with `synchronous=normal`, so no fsync is counted.

    python -m bench.instructions N [cancel|get_payment] [ours|stack]

`ours`: through the interceptor, the servicer, the service, metrics and the access line, logged
as `serve` logs when stderr is not a terminal. `stack`: bench/floor.py's stack's floor, its
servicer called directly. Run under callgrind twice (N=20 and N=220); the difference of the
two totals divided by the difference of N is one call's instructions without the start-up both
runs share. `make bench` does that (`measure()`, N=20 and N=220); by hand:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.20 .venv/bin/python -m bench.instructions 20
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.220 .venv/bin/python -m bench.instructions 220
    callgrind_annotate /tmp/cg.20 | grep 'PROGRAM TOTALS'"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
from kara.sessions.v1 import sessions_pb2 as pb

from kara_sessions_server.adapters import migrations
from kara_sessions_server.adapters.storage import open_storage
from kara_sessions_server.adapters.unit_of_work import SqlUnitOfWorkFactory
from kara_sessions_server.domain.clock import SystemClock
from kara_sessions_server.entrypoints import logs
from kara_sessions_server.entrypoints.application import build_application
from kara_sessions_server.entrypoints.grpc import sizes
from kara_sessions_server.entrypoints.grpc.interceptor import Authenticator, CallInterceptor
from kara_sessions_server.entrypoints.grpc.metrics import Metrics
from kara_sessions_server.entrypoints.grpc.servicers import SessionServicer
from kara_sessions_server.entrypoints.settings import Settings

from . import floor
from .profile import PROFESSIONAL, _book, _Context

# Each measured call, by the name the load generator gives its workload, and its method.
RPCS = {"cancel": "CancelSession", "get_payment": "GetPayment", "list_payments": "ListPayments"}
# A ListPayments page, as the load generator asks for one.
PAGE_SIZE = 50
SERVERS = ("ours", "stack")
# Every run books (or populates) this many sessions, outside the measured calls' count.
SESSIONS = 220


def _requests(rpc: str, ids: list[str], n: int, professional_id: str) -> list[Any]:
    if rpc == "cancel":
        return [
            pb.CancelSessionRequest(session_id=i, cancelled_by=pb.PARTY_CLIENT, request_id=str(uuid.uuid4()))
            for i in ids[:n]
        ]
    if rpc == "list_payments":
        page = pb.ListPaymentsRequest(
            professional_id=professional_id, section=pb.PAYMENT_SECTION_UNPAID, page_size=PAGE_SIZE
        )
        return [page] * n
    return [pb.GetPaymentRequest(session_id=ids[k % len(ids)]) for k in range(n)]


def ours(workdir: Path, rpc: str, n: int) -> None:
    storage = open_storage(f"sqlite:///{workdir / 'cg.db'}", max_connections=2, sqlite_synchronous="normal")
    line = (workdir / "access.log").open("w")
    logs.configure("INFO", "json", stream=line)
    try:
        migrations.prepare(storage)
        storage.keep_connections()  # as on the server's unary threads
        metrics = Metrics()
        settings = Settings()
        budget = sizes.record_bytes(settings.max_message_bytes)
        app = build_application(settings, SqlUnitOfWorkFactory(storage), SystemClock(), tell=metrics.count)
        app.programmes.ensure_default(settings.notice_window)
        servicer = SessionServicer(app.sessions, budget)
        interceptor = CallInterceptor(
            Authenticator(None), metrics, frozenset({"kara.sessions.v1.SessionService"})
        )
        name = RPCS[rpc]
        wrapped = interceptor.intercept_service(
            lambda _: grpc.unary_unary_rpc_method_handler(getattr(servicer, name)),
            SimpleNamespace(method=f"/kara.sessions.v1.SessionService/{name}"),  # type: ignore[arg-type]
        )
        assert wrapped is not None
        call: Any = wrapped.unary_unary
        ids = [s.session_id for s in _book(app.sessions, SESSIONS, "client-cg")]
        context = _Context()
        for request in _requests(rpc, ids, n, PROFESSIONAL):
            call(request, context)
    finally:
        logging.getLogger().handlers.clear()
        line.close()
        storage.close()


def stack(workdir: Path, rpc: str, n: int) -> None:
    path = str(workdir / "floor.db")
    floor.populate(path, SESSIONS)
    floor.log_access_lines((workdir / "access.log").open("w"))
    servicer = floor.StackFloorServicer(path, synchronous="normal")
    call = getattr(servicer, RPCS[rpc])
    context = _Context()
    for request in _requests(rpc, [f"floor-{i}" for i in range(SESSIONS)], n, floor.PROFESSIONAL):
        call(request, context)


def measure(rpc: str, server: str, workdir: Path, few: int = 20, many: int = 220) -> float | None:
    """Instructions per call (callgrind), or None without valgrind on this machine."""
    if shutil.which("valgrind") is None:
        return None
    totals = []
    for n in (few, many):
        out = workdir / f"callgrind.{rpc}.{server}.{n}"
        subprocess.run(
            [
                "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                sys.executable, "-m", "bench.instructions", str(n), rpc, server,
            ],
            cwd=Path(__file__).resolve().parents[1],
            # Hashing's seed changes dicts' layout and with it a few percent of the count.
            env={**os.environ, "PYTHONHASHSEED": "0"},
            check=True,
            capture_output=True,
        )  # fmt: skip
        # The totals line callgrind writes into its output: "summary: <instructions>".
        found = re.search(r"^summary: (\d+)", out.read_text(errors="replace"), re.MULTILINE)
        assert found, f"no summary in {out}"
        totals.append(int(found.group(1)))
    return (totals[1] - totals[0]) / (many - few)


if __name__ == "__main__":
    count = int(sys.argv[1])
    which = sys.argv[2] if len(sys.argv) > 2 else "cancel"
    by = sys.argv[3] if len(sys.argv) > 3 else "ours"
    if which not in RPCS or by not in SERVERS:
        sys.exit(f"usage: python -m bench.instructions N [{'|'.join(RPCS)}] [{'|'.join(SERVERS)}]")
    with tempfile.TemporaryDirectory() as tmp:
        (ours if by == "ours" else stack)(Path(tmp), which, count)
