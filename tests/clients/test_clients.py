"""Clients in other languages, generated from protos/buf.gen.yaml as another team would
(issue 38): `make test-clients`. Go's and Java's are generated and compiled against Debian's
protobuf and gRPC libraries; the TypeScript/JavaScript one (protoc-gen-es, @connectrpc/connect)
also calls a real server. The Makefile installs the plugins, compilers and libraries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.clock import FakeClock
from ..support.database import ON_CI

pytestmark = [pytest.mark.clients, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools"
BUF = TOOLS / "node_modules" / ".bin" / "buf"
NODE_CALLER = TOOLS / "node-caller"
# What the Makefile's client-tools target puts on PATH besides Debian's own /usr/bin.
PATH = os.pathsep.join([str(TOOLS / "bin"), str(NODE_CALLER / "node_modules" / ".bin"), os.environ["PATH"]])
# Debian's packages of the libraries the generated code needs (libprotobuf-java, libgrpc-java
# and their dependencies; golang-google-protobuf-dev, golang-google-grpc-dev).
JAVA_LIBRARIES = ["protobuf", "grpc-api", "grpc-stub", "grpc-protobuf", "grpc-protobuf-lite", "guava"]
JAVA_ANNOTATIONS = "geronimo-annotation-1.3-spec"  # javax.annotation.Generated, for grpc-java 1.41
GO_LIBRARIES = Path("/usr/share/gocode")


def _need(*tools: str) -> None:
    missing = [tool for tool in tools if not (Path(tool).exists() or shutil.which(tool, path=PATH))]
    if missing:
        message = f"not installed: {', '.join(missing)} (make test-clients installs them)"
        if ON_CI:
            pytest.fail(f"CI=true requires the generated clients' tests: {message}")
        pytest.skip(message)


def _template(out: Path, keep: str | None = None) -> str:
    """buf.gen.yaml as written, its output moved under `out` (and only `keep`'s plugin)."""
    template: dict[str, Any] = yaml.safe_load((ROOT / "protos" / "buf.gen.yaml").read_text())
    plugins = [p for p in template["plugins"] if keep is None or p.get("local") == keep]
    for plugin in plugins:
        plugin["out"] = str(out / plugin["out"])
    return json.dumps({**template, "plugins": plugins})


def _generate(out: Path, source: Path | None = None, keep: str | None = None, *paths: str) -> None:
    command = [str(BUF), "generate", str(source or ROOT / "protos"), "--template", _template(out, keep)]
    for path in paths:
        command += ["--path", path]
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "PATH": PATH}, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every language of buf.gen.yaml, generated once: gen/go, gen/java, gen/es."""
    _need(str(BUF), "protoc", "protoc-gen-go", "protoc-gen-go-grpc", "protoc-gen-grpc-java", "protoc-gen-es")
    out = tmp_path_factory.mktemp("clients")
    _generate(out)
    return out / "gen"


def test_every_language_is_generated_under_its_own_package(generated: Path) -> None:
    go = generated / "go" / "kara" / "sessions" / "v1"
    assert {p.name for p in go.glob("*_grpc.pb.go")} == {
        f"{name}_grpc.pb.go" for name in ("sessions", "credits", "invoices", "events", "programmes")
    }
    assert all(p.read_text().startswith("// Code generated") for p in go.iterdir())
    assert "package sessionsv1\n" in (go / "sessions.pb.go").read_text()
    java = generated / "java" / "com" / "kara" / "sessions" / "v1"
    assert (java / "SessionServiceGrpc.java").is_file() and (java / "CancelSessionRequest.java").is_file()
    es = generated / "es" / "kara" / "sessions" / "v1"
    assert {p.name for p in es.iterdir()} >= {"sessions_pb.js", "sessions_pb.d.ts"}


def test_the_go_client_compiles_against_the_go_grpc_libraries(generated: Path, tmp_path: Path) -> None:
    _need("go")
    # GOPATH mode with Debian's packaged libraries: these machines reach no Go module proxy.
    module = tmp_path / "src" / "github.com" / "kara" / "kara-sessions"
    shutil.copytree(generated / "go", module / "gen" / "go")
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{tmp_path}{os.pathsep}{GO_LIBRARIES}",
        "GOCACHE": str(tmp_path / "cache"),
        "GOFLAGS": "",
    }
    done = subprocess.run(
        ["go", "vet", "./gen/go/..."], cwd=module, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_the_java_client_compiles_against_grpc_java(generated: Path, tmp_path: Path) -> None:
    _need("javac")
    jars = [Path("/usr/share/java") / f"{name}.jar" for name in [*JAVA_LIBRARIES, JAVA_ANNOTATIONS]]
    _need(*map(str, jars))
    sources = sorted(map(str, (generated / "java").rglob("*.java")))
    done = subprocess.run(
        ["javac", "-nowarn", "-d", str(tmp_path), "-cp", os.pathsep.join(map(str, jars)), *sources],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "com" / "kara" / "sessions" / "v1" / "SessionServiceGrpc.class").is_file()


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    # The language is what is under test here, not the database.
    return f"sqlite:///{tmp_path / 'kara.db'}"


@pytest.fixture
def es_caller(generated: Path, tmp_path: Path) -> Iterator[Path]:
    """tests/node/generated.mjs beside the generated code and Node's packages, with the
    googleapis error details (google-proto-files) generated by the same plugin."""
    _need("node")
    caller = tmp_path / "caller"
    caller.mkdir()
    (caller / "node_modules").symlink_to(NODE_CALLER / "node_modules")
    shutil.copytree(generated / "es", caller / "gen")
    googleapis = NODE_CALLER / "node_modules" / "google-proto-files"
    error_details = googleapis / "google" / "rpc" / "error_details.proto"
    _generate(tmp_path, googleapis, "protoc-gen-es", str(error_details))
    shutil.copytree(tmp_path / "gen" / "es" / "google", caller / "gen" / "google")
    shutil.copy(ROOT / "tests" / "node" / "generated.mjs", caller / "generated.mjs")
    yield caller / "generated.mjs"


def test_the_typescript_client_cancels_retries_and_reads_refusals(
    es_caller: Path, server: RunningServer, clock: FakeClock
) -> None:
    done = subprocess.run(
        ["node", str(es_caller), f"127.0.0.1:{server.port}", clock.now().isoformat()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = {line.pop("row"): line for line in map(json.loads, done.stdout.splitlines())}
    late = lines["professional < 24h, ticked"]
    assert (late["state"], late["payment"], late["section"]) == ("CANCELLED_PAID", "PAID", "PAID")
    # A Timestamp read back through the language's own date type.
    starts_at = (clock.now() + timedelta(hours=10)).isoformat(timespec="milliseconds")
    assert late["startsAt"] == starts_at.replace("+00:00", "Z")
    assert lines["retry"] == {"state": "CANCELLED_PAID", "replayed": "true"}
    twice = lines["cancel twice"]
    assert (twice["code"], twice["reason"], twice["metadata"]["state"]) == (
        "FailedPrecondition",
        "SESSION_NOT_BOOKED",
        "CANCELLED_PAID",
    )
    assert lines["unknown enum"] == {
        "code": "InvalidArgument",
        "reason": "INVALID_REQUEST",
        "metadata": {},
        "fields": ["section"],
    }
    assert (lines["no such session"]["code"], lines["no such session"]["reason"]) == ("NotFound", "NOT_FOUND")
