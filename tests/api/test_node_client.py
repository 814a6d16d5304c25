"""A caller no one here wrote, in another language: Node's @grpc/grpc-js with protos/ loaded
at run time (tests/node/caller.mjs), no deadline, one channel reused. It runs the article's five
rows, sends an unknown enum number and a burst above the worker count. `make test` installs
its two packages into .tools/node-caller; on CI it must run."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.clock import FakeClock
from ..support.database import ON_CI, assert_ledger_balances

ROOT = Path(__file__).resolve().parents[2]
CALLER = ROOT / "tests" / "node" / "caller.mjs"
# The README's recipe for a refusal's reason and fields, which the caller uses.
RECIPE = ROOT / "tests" / "node" / "refusal.mjs"
CACHE = ROOT / ".tools" / "node-caller"


def _node() -> str:
    node = shutil.which("node")
    missing = None if node else "node is not installed"
    if missing is None and not (CACHE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing = f"the Node packages are not in {CACHE} (make test installs them)"
    if missing:
        if ON_CI:
            pytest.fail(f"CI=true requires the Node client test: {missing}")
        pytest.skip(missing)
    assert node is not None
    return node


def test_a_node_client_without_deadlines_gets_the_articles_answers(
    server: RunningServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    node = _node()
    # ESM finds packages beside the script, so the caller runs from the cache folder.
    for script in (CALLER, RECIPE):
        shutil.copy(script, CACHE / script.name)
    done = subprocess.run(
        [
            node,
            str(CACHE / CALLER.name),
            f"127.0.0.1:{server.port}",
            str(ROOT / "protos"),
            clock.now().isoformat(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = {line["row"]: line for line in map(json.loads, done.stdout.splitlines())}
    voided = {"code": "OK", "state": "SESSION_STATE_CANCELLED_VOIDED", "payment": "PAYMENT_STATE_VOIDED"}
    paid = {"code": "OK", "state": "SESSION_STATE_CANCELLED_PAID", "payment": "PAYMENT_STATE_PAID"}
    expected = {
        "client >= 24h": (voided, "PAYMENT_SECTION_UNPAID"),
        "professional >= 24h": (voided, "PAYMENT_SECTION_UNPAID"),
        "client < 24h": (paid, "PAYMENT_SECTION_PAID"),
        "professional < 24h, ticked": (paid, "PAYMENT_SECTION_PAID"),
        "professional < 24h, not ticked": (voided, "PAYMENT_SECTION_UNPAID"),
    }
    for row, (outcome, section) in expected.items():
        assert lines[row] == {"row": row, **outcome, "section": section}
    assert lines["unknown enum"]["code"] == "INVALID_ARGUMENT"
    assert "section" in lines["unknown enum"]["details"]
    # Read through the README's recipe: the reason to branch on, and the field to fix.
    assert lines["unknown enum"]["reason"] == "INVALID_REQUEST"
    assert [f["field"] for f in lines["unknown enum"]["fields"]] == ["section"]
    codes = lines["burst"]["codes"]
    assert codes == {"OK": 24, "NOT_FOUND": 24}, codes
    assert_ledger_balances(server)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_the_readme_shows_the_recipe_the_node_test_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"```js\n{RECIPE.read_text()}```" in readme, (
        "README's Node recipe differs from tests/node/refusal.mjs"
    )
