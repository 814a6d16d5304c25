"""What deploy/ hands a platform agrees with the server it runs (issue 38): the manifests'
configuration uses only settings the server has, and the alerts use only metrics it serves.
`make lint` validates the manifests against Kubernetes' schemas and unit-tests the alerts."""

from __future__ import annotations

import contextlib
import re
import tomllib
from datetime import timedelta
from pathlib import Path

import click
import yaml

from kara_sessions_client.client import KaraError, SessionsClient
from kara_sessions_server.entrypoints.commands import serve
from kara_sessions_server.entrypoints.grpc.server import RunningServer

from ..support.clock import FakeClock

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _documents(name: str) -> list[dict[str, object]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]


def test_the_config_map_holds_only_the_servers_settings_and_fits_the_grace_period() -> None:
    [config] = _documents("config.yaml")
    data = config["data"]
    assert isinstance(data, dict)
    settings = tomllib.loads(data["kara.toml"])
    known = {p.name for p in serve.params}  # what `serve --config` accepts
    assert set(settings) <= known, set(settings) - known
    [server, _service, _budget] = _documents("server.yaml")
    spec = server["spec"]["template"]["spec"]  # type: ignore[index]
    assert spec["terminationGracePeriodSeconds"] > settings["grace_seconds"] + 1


def test_every_alert_uses_metrics_the_server_or_the_relay_serves(
    server: RunningServer, kara: SessionsClient, clock: FakeClock
) -> None:
    kara.grant_credits("client-1", 1)
    session_id = kara.book("client-1", "p", clock.now() + timedelta(days=2)).session_id
    kara.cancel(session_id, "client")
    with contextlib.suppress(KaraError):  # SESSION_NOT_BOOKED, counted as a refusal
        kara.cancel(session_id, "client")
    served = {m.name for m in server.metrics.registry.collect()}
    served |= {"kara_relay_lag_seconds", "kara_relay_events_relayed"}  # the relay's own
    assert (
        server.metrics.registry.get_sample_value(
            "kara_refusals_total", {"method": "CancelSession", "reason": "SESSION_NOT_BOOKED"}
        )
        == 1
    )
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    for rule in rules["groups"][0]["rules"]:
        for metric in re.findall(r"\b(kara_[a-z_]+)", rule["expr"]):
            family = re.sub(r"_(total|bucket|count|sum)$", "", metric)
            assert family in served, f"{rule['alert']} uses {metric}, which nothing serves"


def _flags(command: click.Command) -> set[str]:
    return {name for p in command.params for name in (*p.opts, *p.secondary_opts)}


def test_the_compose_file_runs_what_the_cli_accepts_and_is_the_only_insecure_one() -> None:
    """compose.yaml is for local trials (it need not run in CI): its commands use only flags the
    CLI has, and only it says --insecure (the image's own command keeps the production checks)."""
    from kara_sessions_client.cli import main

    services = yaml.safe_load((DEPLOY.parent / "compose.yaml").read_text())["services"]
    assert {"postgres", "nats", "migrate", "server", "relay"} <= set(services)
    relay = main.commands["relay"]
    allowed = {
        "server": _flags(serve),
        "migrate": _flags(main.commands["migrate"]),
        "relay": _flags(main) | _flags(relay),
    }
    for name, flags in allowed.items():
        for word in services[name]["command"]:
            if word.startswith("--"):
                assert word.split("=", 1)[0] in flags, f"{name}: {word} is not a flag of the command"
    assert "--insecure" in services["server"]["command"]
    assert "--insecure" not in (DEPLOY.parent / "Containerfile").read_text().split("CMD", 1)[1]


def test_every_image_reference_names_the_packages_version() -> None:
    """The version is declared once (pyproject.toml); the image tags that a release must move
    with it are checked here, so a release cannot leave one behind."""
    root = DEPLOY.parent
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    [kustomization] = yaml.safe_load_all((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    assert [image["newTag"] for image in kustomization["images"]] == [version]
    compose = yaml.safe_load((root / "compose.yaml").read_text())
    images = [service.get("image", "") for service in compose["services"].values()]
    tags = {image for image in images if image.startswith("kara-sessions")}
    assert tags == {f"kara-sessions:{version}"}
    readme = set(re.findall(r"kara-sessions:(\d+\.\d+\.\d+)", (root / "README.md").read_text()))
    assert readme == {version}
