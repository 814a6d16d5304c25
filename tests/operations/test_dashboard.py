"""The dashboard and the alerts against a real Prometheus (issue 38): Debian's `prometheus`
(which `make test` installs as root) scrapes a real server under a little load of every kind the
panels show, and every panel's query and every metric an alert reads returns data. The alerts'
thresholds are unit-tested by `promtool test rules` in `make lint`."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from kara.sessions.v1 import events_pb2 as epb

from kara_sessions_client.client import NO_RETRY, KaraError, SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start

from ..support.clock import FakeClock
from ..support.processes import binary, free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# The relay's metrics come from the relay's own process (tests/operations/test_relay.py).
RELAYS = ("kara_relay_",)


@pytest.fixture
def loaded(tmp_path: Path, clock: FakeClock) -> Iterator[RunningServer]:
    """A server with metrics, having served what every panel shows: cancellations both ways,
    a refusal, a move, an event stream, and a database error (a lock held past the bound)."""
    db = tmp_path / "kara.db"
    running = start(
        Settings(
            listen="127.0.0.1:0",
            database_url=f"sqlite:///{db}",
            metrics_port=free_port(),
            max_transaction_seconds=1,
        ),
        clock=clock,
    )
    try:
        with SessionsClient(f"127.0.0.1:{running.port}", retry=NO_RETRY) as kara:
            kara.grant_credits("client-1", 4)
            for hours in (5, 50):
                session_id = kara.book("client-1", "pro-1", clock.now() + timedelta(hours=hours)).session_id
                kara.cancel(session_id, "client")
            with pytest.raises(KaraError):
                kara.cancel(session_id, "client")  # SESSION_NOT_BOOKED
            moved = kara.book("client-1", "pro-1", clock.now() + timedelta(days=3)).session_id
            kara.reschedule(moved, clock.now() + timedelta(days=4), "client")
            stream = kara.feed.StreamEvents(epb.StreamEventsRequest(), timeout=10)
            received = threading.Thread(target=lambda: [e for _, e in zip(range(3), stream, strict=False)])
            received.start()
            received.join(10)
            stream.cancel()
            holder = sqlite3.connect(db, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            try:
                with pytest.raises(KaraError):
                    kara.grant_credits("client-2", 1)
            finally:
                holder.rollback()
                holder.close()
        yield running
    finally:
        running.stop(grace=1)


@pytest.fixture
def prometheus(loaded: RunningServer, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(DEPLOY / "prometheus" / "alerts.yaml")],
                "scrape_configs": [
                    {
                        "job_name": "kara",
                        "static_configs": [{"targets": [f"127.0.0.1:{loaded.metrics_port}"]}],
                    }
                ],
            }
        )
    )
    data = tmp_path / "tsdb"
    command = [
        binary(
            (Path("/usr/bin/prometheus"),), "prometheus", "no prometheus (Debian's, which make test installs)"
        ),
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


def _query(base: str, expr: str) -> list[object]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as answer:
        body = json.load(answer)
    assert body["status"] == "success", body
    result: list[object] = body["data"]["result"]
    return result


def _until_data(base: str, expr: str, seconds: float = 45) -> list[object]:
    deadline = time.monotonic() + seconds
    while True:
        try:
            found = _query(base, expr)
        except OSError:
            found = []  # Prometheus still starting
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_every_panel_and_every_alerts_metric_has_data_from_a_real_scrape(prometheus: str) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "kara-sessions.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(queries) >= 8
    for expr in queries:
        assert _until_data(prometheus, expr), f"the panel query {expr!r} returned no data"
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"][0]["rules"]
    for rule in rules:
        selectors = set(re.findall(r"\b(kara_[a-z_]+)(\{[^}]*\})?", rule["expr"]))
        for metric, labels in selectors:
            if metric.startswith(RELAYS):
                continue
            # The selector without its label filter: the series the alert reads exist.
            assert _until_data(prometheus, metric), f"{rule['alert']}: no {metric}{labels} in the scrape"
    # Prometheus loaded the rules themselves, and evaluates them without error.
    groups = json.load(urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=5))["data"]["groups"]
    assert {r["name"] for g in groups for r in g["rules"]} == {r["alert"] for r in rules}
    assert all(r["health"] != "err" for g in groups for r in g["rules"])
