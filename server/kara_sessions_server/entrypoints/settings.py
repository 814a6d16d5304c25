"""Every setting of the server, declared once: a field of Settings (its name, type and default)
and, for the ones an operator sets, an Option (its help, and how the command line spells and
counts it). `kara-sessions serve`'s flags, their KARA_* variables and the --config file's keys
are generated from these (commands.py); the composition root (grpc/server.py) reads Settings.

Only the standard library, click and the pure domain are imported here: the client install
builds its CLI from this module without the server's dependencies."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import click

from kara_sessions_server.domain.programme import DEFAULT_TERMS

if TYPE_CHECKING:
    import grpc

    from kara_sessions_server.entrypoints.grpc.tokens import TokenTable

SqliteSynchronous = Literal["full", "normal"]

# Unary calls running at once, by database. Fewer threads spend less CPU handing the interpreter
# lock to one another: on SQLite, whose writers queue anyway, 4 cost 5-10% less CPU per call than
# 16 (BENCHMARKS.md, issue 15); PostgreSQL calls wait on the network, so more of them overlap.
DEFAULT_WORKERS = {"sqlite": 4, "postgresql": 16}
# Our largest request is a few hundred bytes and a page of 1000 payments about 300 KB.
MAX_MESSAGE_BYTES = 1024 * 1024
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
FILE = click.Path(exists=True, dir_okay=False)


@dataclass(frozen=True)
class Option:
    """How an operator sets a Settings field: `--FLAG` on the command line, the KARA_FLAG
    variable, or the `flag` key of the --config file (FLAG is `name`, or the field's name, with
    dashes on the command line and underscores elsewhere)."""

    help: str
    name: str = ""
    # A click type; None: text.
    type: Any = None
    # The command line counts these (hours, days); the field holds a timedelta.
    unit: timedelta | None = None
    is_flag: bool = False
    # What the field holds, from what the command line gives (a file's contents, a parsed list).
    read: Callable[[Any], Any] | None = None
    # The command line's default, from the field's (where it is not `unit` or `read` undone).
    shown: Callable[[Any], Any] | None = None


def option(**kwargs: Any) -> dict[str, Option]:
    """A field's metadata declaring how it is set (dataclasses.field(metadata=option(...)))."""
    return {"option": Option(**kwargs)}


def _file_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def _tokens(path: str) -> TokenTable:
    from kara_sessions_server.entrypoints.grpc.tokens import TokenTable

    return TokenTable.load(path)


def _cpus(text: str) -> tuple[int, ...]:
    from kara_sessions_server.entrypoints import cpus

    return cpus.parse(text) if text else ()


@dataclass(frozen=True)
class Settings:
    """The server's settings. A field with an Option is one `kara-sessions serve` takes."""

    listen: str = field(default="127.0.0.1:50051", metadata=option(help="HOST:PORT to serve on."))
    database_url: str = field(
        default="sqlite:///kara-sessions.db",
        metadata=option(help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB."),
    )
    sqlite_synchronous: SqliteSynchronous = field(
        default="full",
        metadata=option(
            type=click.Choice(["full", "normal"]),
            help="SQLite only. full: an acknowledged change survives a power loss or OS crash. normal: "
            "faster commits, but after a power loss or OS crash the last acknowledged changes may "
            "roll back, and their callers, told OK, will never retry them. Keep full for real credits.",
        ),
    )
    # The default programme's notice window when the server first creates that programme.
    notice_window: timedelta = field(
        default=DEFAULT_TERMS.notice_window,
        metadata=option(
            name="notice_window_hours",
            type=click.FloatRange(min=0, min_open=True),
            unit=HOUR,
            help="The default programme's notice window when the server first creates that programme "
            "(an empty database); afterwards change it with `kara-sessions programme update default`.",
        ),
    )
    # Bearer tokens; None turns authentication off (allowed on loopback only, or with insecure).
    tokens: TokenTable | None = field(
        default=None,
        metadata=option(
            name="tokens_file",
            type=FILE,
            read=_tokens,
            help="TOML file of bearer-token hashes and principals.",
        ),
    )
    # TLS: PEM server certificate chain and key; with client_ca, clients must present a
    # certificate it signed (mutual TLS).
    tls_cert: bytes | None = field(
        default=None, metadata=option(type=FILE, read=_file_bytes, help="PEM server certificate chain.")
    )
    tls_key: bytes | None = field(
        default=None, metadata=option(type=FILE, read=_file_bytes, help="PEM server private key.")
    )
    client_ca: bytes | None = field(
        default=None,
        metadata=option(
            type=FILE, read=_file_bytes, help="PEM CA: require client certificates it signed (mTLS)."
        ),
    )
    # Listen on a non-loopback address without TLS and authentication anyway.
    insecure: bool = field(
        default=False,
        metadata=option(
            is_flag=True, help="Allow a non-loopback --listen without TLS and tokens (never in production)."
        ),
    )
    # Prometheus /metrics on this port (0: any free port); None: no metrics endpoint.
    metrics_port: int | None = field(
        default=None,
        metadata=option(
            type=click.IntRange(0, 65535),
            help="Serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (default: off).",
        ),
    )
    metrics_host: str = field(default="127.0.0.1", metadata=option(help="Metrics address."))
    # Unary calls served at once; None: the database's default (DEFAULT_WORKERS).
    max_workers: int | None = field(
        default=None,
        metadata=option(
            type=click.IntRange(1, 256),
            help="Calls served at once, each with a database connection (default: 4 on SQLite, 16 on "
            "PostgreSQL; BENCHMARKS.md says why). Event streams have threads of their own.",
        ),
    )
    max_message_bytes: int = field(
        default=MAX_MESSAGE_BYTES,
        metadata=option(type=click.IntRange(4096, 64 * 1024 * 1024), help="Largest request or response."),
    )
    # Events older than this are pruned; a cursor older than what is kept is OUT_OF_RANGE.
    event_retention: timedelta = field(
        default=timedelta(days=30),
        metadata=option(
            name="event_retention_days",
            type=click.FloatRange(min=0, min_open=True),
            unit=DAY,
            help="Keep events this long (and while their request_ids are kept, "
            "--request-id-retention-days); a consumer's cursor older than that gets OUT_OF_RANGE.",
        ),
    )
    # Open StreamEvents calls, each on a thread of its own beside the workers (0: ListEvents only).
    max_event_streams: int = field(
        default=4,
        metadata=option(
            type=click.IntRange(0, 1024),
            help="Open StreamEvents calls at once, each on a thread of its own beside --max-workers "
            "(0: ListEvents only).",
        ),
    )
    # The longest any transaction may take, whatever its call's deadline.
    max_transaction_seconds: float = field(
        default=10.0,
        metadata=option(
            type=click.FloatRange(0.1, 600),
            help="No transaction may take longer (less if its call's deadline comes first); then it "
            "rolls back.",
        ),
    )
    settle_interval_seconds: float = field(
        default=60.0,
        metadata=option(
            type=click.FloatRange(0.1, 3600),
            help="How often to settle the sessions nobody marked that their programme's "
            "settle_unmarked_after says are due (every replica sweeps; each session is settled once).",
        ),
    )
    # A sponsor's k (domain/usage.py). At least 3: with 2, "suppressed" could only mean 1.
    report_min_count: int = field(
        default=5,
        metadata=option(
            type=click.IntRange(3, 1000),
            help="The smallest count a programme's sponsor is shown: counts from 1 to this minus 1 "
            "are suppressed, and every other is rounded down to a multiple of it.",
        ),
    )
    # A session may start at most this far ahead of its booking.
    max_booking_horizon: timedelta = field(
        default=timedelta(days=730),
        metadata=option(
            name="max_booking_horizon_days",
            type=click.FloatRange(1, 3650),
            unit=DAY,
            help="How far ahead a session may be booked; a later starts_at is INVALID_ARGUMENT.",
        ),
    )
    # Stored request_id results older than this are forgotten: a retry that late is a new request.
    request_id_retention: timedelta = field(
        default=timedelta(days=7),
        metadata=option(
            name="request_id_retention_days",
            type=click.FloatRange(min=0, min_open=True),
            unit=DAY,
            help="Keep each request_id's first result this long; reusing an older request_id starts a "
            "new request.",
        ),
    )
    # None: audit rows are kept for good.
    audit_retention: timedelta | None = field(
        default=None,
        metadata=option(
            name="audit_retention_days",
            type=click.FloatRange(min=0, min_open=True),
            unit=DAY,
            help="Prune audit rows older than this (default: keep them, they are the record).",
        ),
    )
    grace_seconds: float = field(
        default=10.0,
        metadata=option(
            type=click.FloatRange(0),
            help="On SIGTERM/SIGINT, how long calls in flight may finish; then their transactions are "
            "interrupted and rolled back, and the process exits within a second.",
        ),
    )
    # Export spans over OTLP/gRPC to this collector (entrypoints/tracing.py); the standard
    # OTEL_EXPORTER_OTLP_* variables work too. None and no such variable: no tracing.
    otlp_endpoint: str | None = field(
        default=None,
        metadata=option(
            help="Export a trace span per RPC and per database transaction to this OpenTelemetry "
            "collector (OTLP/gRPC, e.g. http://127.0.0.1:4317). The standard OTEL_EXPORTER_OTLP_* and "
            "OTEL_SERVICE_NAME variables apply too. Default: no tracing.",
        ),
    )
    processes: int = field(
        default=1,
        metadata=option(
            type=click.IntRange(1, 64),
            help="Server processes sharing the port (SO_REUSEPORT), to use more than one core. "
            "PostgreSQL only; each process has its own --max-workers threads and connections, and its "
            "own metrics port (--metrics-port + 0, 1, ...).",
        ),
    )
    # The CPUs this process's threads run on (entrypoints/cpus.py); empty: wherever the OS puts them.
    cpus: tuple[int, ...] = field(
        default=(),
        metadata=option(
            read=_cpus,
            shown=lambda cpus: ",".join(map(str, cpus)),
            help="Keep the server on these CPUs, e.g. 2 or 2,3 or 2-5 (Linux); with --processes N, each "
            "process on one of them in turn. One CPU per process spares its threads the hand-offs "
            "between CPUs (a quarter to a half less CPU per call, BENCHMARKS.md); give CPUs nothing "
            "else is pinned to. Default: wherever the OS schedules it.",
        ),
    )
    log_level: str = field(
        default="INFO",
        metadata=option(
            type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), help="INFO logs one line per RPC."
        ),
    )
    log_format: str = field(
        default="auto",
        metadata=option(
            type=click.Choice(["auto", "json", "text"]), help="auto: JSON lines unless stderr is a terminal."
        ),
    )
    # Set by the server itself, never by an operator:
    # how often it prunes (each batch its own short transaction);
    event_prune_seconds: float = 60.0
    # false in all but one of `serve --processes N`'s processes (one pruner is enough);
    prunes: bool = True
    # let the other processes of `serve --processes N` listen on the same port (SO_REUSEPORT);
    share_port: bool = False
    # how often the health service probes the database.
    health_check_seconds: float = 2.0

    @property
    def workers(self) -> int:
        if self.max_workers is not None:
            return self.max_workers
        return DEFAULT_WORKERS["sqlite" if urlsplit(self.database_url).scheme == "sqlite" else "postgresql"]

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None and self.tls_key is None:
            if self.client_ca is not None:
                raise ValueError("a client CA (mutual TLS) needs a server certificate and key")
            return None
        if self.tls_cert is None or self.tls_key is None:
            raise ValueError("TLS needs both a server certificate and its key")
        import grpc

        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def check_exposure(self) -> None:
        """Beyond loopback, a server without TLS and authentication is a mistake unless said
        out loud with `insecure`."""
        if self.insecure or is_loopback(self.listen):
            return
        missing = [
            what
            for what, present in (
                ("TLS (--tls-cert/--tls-key)", self.tls_cert),
                ("auth (--tokens-file)", self.tokens),
            )
            if present is None
        ]
        if missing:
            raise ValueError(
                f"refusing to listen on {self.listen} without {' and '.join(missing)}: anyone who can "
                "reach it could cancel sessions. Configure them, listen on 127.0.0.1, or pass --insecure."
            )


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, 0.0.0.0 or [::]: reachable from elsewhere


# --- the command line, generated ------------------------------------------------------------


def _declared(settings: type[Settings]) -> list[tuple[dataclasses.Field[Any], Option]]:
    return [(f, f.metadata["option"]) for f in dataclasses.fields(settings) if "option" in f.metadata]


def param_name(f: dataclasses.Field[Any], opt: Option) -> str:
    """The option's name as a config-file key and a Python parameter (underscores)."""
    return opt.name or f.name


def file_options(settings: type[Settings] = Settings) -> frozenset[str]:
    """The options whose values name files (a config file's relative paths are relative to it)."""
    return frozenset(param_name(f, opt) for f, opt in _declared(settings) if opt.type is FILE)


def _cli_default(f: dataclasses.Field[Any], opt: Option) -> Any:
    value: Any = f.default
    if value is None or opt.is_flag:
        return value
    if opt.unit is not None:
        return value / opt.unit
    if opt.shown is not None:
        return opt.shown(value)
    return value


def click_options(
    settings: type[Settings] = Settings, *, only: frozenset[str] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorates a click command with the options of `settings` (or `only` those named), in
    their declared order: each a flag, a KARA_* variable and a config-file key."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for f, opt in reversed(_declared(settings)):
            name = param_name(f, opt)
            if only is not None and name not in only:
                continue
            default = _cli_default(f, opt)
            kwargs: dict[str, Any] = {"help": opt.help, "envvar": f"KARA_{name.upper()}", "show_envvar": True}
            if opt.is_flag:
                kwargs["is_flag"] = True
            else:
                kwargs.update(default=default, show_default=default not in (None, ""))
                if opt.type is not None:
                    kwargs["type"] = opt.type
            command = click.option(f"--{name.replace('_', '-')}", **kwargs)(command)
        return command

    return decorate


def from_command_line(values: dict[str, Any], settings: type[Settings] = Settings) -> Settings:
    """Settings from a command's parameters (what click_options declared), each converted to
    what its field holds. Raises ValueError (or a file's error) for a value that cannot be."""
    given: dict[str, Any] = {}
    for f, opt in _declared(settings):
        name = param_name(f, opt)
        if name not in values:
            continue
        value = values[name]
        if value is None:
            given[f.name] = f.default
        elif opt.read is not None:
            given[f.name] = opt.read(value)
        elif opt.unit is not None:
            given[f.name] = opt.unit * value
        else:
            given[f.name] = value
    return settings(**given)
