"""`kara-sessions serve` configuration: flags, then KARA_* variables, then the --config file,
then defaults; validated at start with errors a person can act on."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from kara_sessions_server.adapters import storage
from kara_sessions_server.entrypoints.commands import config_option
from kara_sessions_server.entrypoints.grpc.server import SERVICE_NAMES
from kara_sessions_server.entrypoints.settings import Settings, click_options, from_command_line, option

from ..support.processes import free_port, serve_command, wait_serving


def serving_port(args: list[str], env: dict[str, str], ports: list[int]) -> int:
    """Starts `serve` with `args` and `env`; returns which of `ports` it came up on. Its stderr
    goes to a file, never to a pipe nobody reads: a server blocked writing a log line to a full
    pipe cannot stop, and the test would blame the server."""
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            serve_command(*args), env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=stderr
        )
        try:
            for port in ports:
                try:
                    wait_serving(port, proc, deadline=3 if port != ports[-1] else 20)
                    return port
                except TimeoutError:
                    continue
            raise AssertionError("the server came up on none of the ports")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                stderr.seek(0)
                raise AssertionError(
                    f"serve did not stop on SIGTERM; it said: {stderr.read()[-4000:]!r}"
                ) from None


def test_flags_beat_environment_beats_config_file(tmp_path: Path) -> None:
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    config = tmp_path / "kara.toml"
    config.write_text(
        f'listen = "127.0.0.1:{file_port}"\ndatabase_url = "sqlite:///{tmp_path / "k.db"}"\n'
        'log_level = "WARNING"\n'
    )
    ports = [file_port, env_port, flag_port]
    base = ["--config", str(config)]
    assert serving_port(base, {}, ports) == file_port
    assert serving_port(base, {"KARA_LISTEN": f"127.0.0.1:{env_port}"}, ports) == env_port
    flagged = [*base, "--listen", f"127.0.0.1:{flag_port}"]
    assert serving_port(flagged, {"KARA_LISTEN": f"127.0.0.1:{env_port}"}, ports) == flag_port
    assert (tmp_path / "k.db").exists(), "the database URL came from the file"


def test_config_file_comes_from_the_environment_too(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "kara.toml"
    config.write_text(f'listen = "127.0.0.1:{port}"\ndatabase_url = "sqlite:///{tmp_path / "k.db"}"\n')
    assert serving_port([], {"KARA_CONFIG": str(config)}, [port]) == port


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('listn = "127.0.0.1:1"\n', "unknown keys ['listn']"),
        ("max_workers = 0\n", "0 is not in the range 1<=x<=256"),
        ('tokens_file = "missing.toml"\n', "does not exist"),
        ("listen = [\n", "is not valid TOML"),
        ('listen = "0.0.0.0:0"\n', "refusing to listen on 0.0.0.0:0 without TLS"),
        ('cpus = "99999"\n', "this process may run on CPUs"),
        ('cpus = "1-x"\n', "--cpus lists CPU numbers and ranges"),
    ],
)
def test_bad_configuration_is_refused_at_start_with_a_clear_error(
    tmp_path: Path, content: str, message: str
) -> None:
    config = tmp_path / "kara.toml"
    config.write_text(content)
    done = subprocess.run(
        serve_command("--config", str(config), "--database-url", f"sqlite:///{tmp_path / 'k.db'}"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert message in " ".join(done.stderr.split()), done.stderr
    assert "Traceback" not in done.stderr


def test_help_documents_every_option_and_its_variable() -> None:
    done = subprocess.run(serve_command("--help"), capture_output=True, text=True, timeout=60, check=True)
    text = " ".join(done.stdout.split())
    for name in (
        "config",
        "listen",
        "database-url",
        "notice-window-hours",
        "tokens-file",
        "tls-cert",
        "tls-key",
        "client-ca",
        "insecure",
        "metrics-port",
        "metrics-host",
        "max-workers",
        "max-message-bytes",
        "grace-seconds",
        "processes",
        "cpus",
        "log-level",
        "log-format",
    ):
        assert f"--{name}" in text
        assert f"KARA_{name.upper().replace('-', '_')}" in text
    # Every service it serves, by the names a reflection client lists.
    for service in SERVICE_NAMES:
        assert service.rsplit(".", 1)[1] in text, service


@dataclass(frozen=True)
class _WithOneMoreSetting(Settings):
    """A new setting: this one field is the whole edit."""

    greeting: str = field(default="hello", metadata=option(help="A setting added in one place."))


def _one_more_command() -> tuple[click.Command, dict[str, Settings]]:
    seen: dict[str, Settings] = {}

    @click.command()
    @config_option
    @click_options(_WithOneMoreSetting)
    def command(**values: Any) -> None:
        seen["settings"] = from_command_line(values, _WithOneMoreSetting)

    return command, seen


def test_a_new_setting_is_one_edit_with_its_flag_variable_and_file_key(tmp_path: Path) -> None:
    """Declared once as a Settings field, a setting gets its flag, KARA_* variable, config-file
    key, help and default, in the documented precedence, and reaches Settings."""
    command, seen = _one_more_command()
    config = tmp_path / "kara.toml"
    config.write_text('greeting = "from the file"\n')

    def greeting(args: list[str], env: dict[str, str]) -> str:
        done = CliRunner().invoke(command, args, env=env, catch_exceptions=False)
        assert done.exit_code == 0, done.output
        settings = seen.pop("settings")
        assert isinstance(settings, _WithOneMoreSetting)
        return settings.greeting

    assert greeting([], {}) == "hello"
    assert greeting(["--config", str(config)], {}) == "from the file"
    assert greeting(["--config", str(config)], {"KARA_GREETING": "from the environment"}) == (
        "from the environment"
    )
    assert greeting(["--config", str(config), "--greeting", "from the flag"], {"KARA_GREETING": "x"}) == (
        "from the flag"
    )
    shown = " ".join(CliRunner().invoke(command, ["--help"]).output.split())
    assert "--greeting TEXT A setting added in one place." in shown and "env var: KARA_GREETING" in shown
    # The server's own settings come with it, converted to what Settings holds.
    assert greeting(["--notice-window-hours", "36"], {}) == "hello"
    assert CliRunner().invoke(command, ["--notice-window-hours", "36"]).exit_code == 0
    assert seen["settings"].notice_window == timedelta(hours=36)


def test_the_storage_defaults_agree_with_the_settings() -> None:
    """open_storage keeps defaults of its own for the tools that open a database (migrate,
    backup, the tests); the server's are Settings'. They must not drift apart."""
    defaults = Settings()
    assert defaults.max_transaction_seconds == storage.DEFAULT_MAX_TRANSACTION_SECONDS
    assert defaults.sqlite_synchronous == storage.DEFAULT_SQLITE_SYNCHRONOUS
