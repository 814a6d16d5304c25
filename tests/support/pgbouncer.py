"""A real PgBouncer in transaction pooling mode in front of the test PostgreSQL, as most
production deployments put one (issue 33): Debian's `pgbouncer`, which `make test` installs.

Its configuration is PgBouncer's defaults but for what a test must name (where to listen, whom
to let in, where PostgreSQL is) and `pool_mode = transaction`, the mode that hands each
transaction whichever server connection is free. Nothing else is asked of it: in particular no
`ignore_startup_parameters`, so a client that sends `options` is refused, as in production."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .processes import binary, free_port

CANDIDATES = (Path("/usr/sbin/pgbouncer"), Path("/usr/bin/pgbouncer"))
# PgBouncer refuses to run as root.
UNPRIVILEGED_USER = "nobody"


def pgbouncer_binary() -> str:
    return binary(
        CANDIDATES,
        "pgbouncer",
        "no pgbouncer binary (Debian's pgbouncer package, which `make test` installs as root)",
    )


class PgBouncer:
    """Listens on its own port on 127.0.0.1; `url(postgres_url)` is the same database through it."""

    def __init__(self, postgres_url: str):
        self.binary = pgbouncer_binary()
        target = urlsplit(postgres_url)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kara-pgbouncer-"))
        # The unprivileged user reads its configuration and writes its pid and socket here.
        self.dir.chmod(0o777)
        users = {target.username or "postgres", "postgres", "root"}
        (self.dir / "users.txt").write_text("".join(f'"{u}" ""\n' for u in sorted(users)))
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={target.hostname or '127.0.0.1'} port={target.port or 5432}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            f"unix_socket_dir = {self.dir}\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'users.txt'}\n"
            "pool_mode = transaction\n"
        )
        for name in ("users.txt", "pgbouncer.ini"):
            (self.dir / name).chmod(0o644)
        self.log = self.dir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, postgres_url: str) -> str:
        parts = urlsplit(postgres_url)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    def start(self) -> None:
        command = [self.binary, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            pwd.getpwnam(UNPRIVILEGED_USER)
            command[1:1] = ["-u", UNPRIVILEGED_USER]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=log, cwd=self.dir)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pgbouncer exited: {self.log.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError(f"pgbouncer did not listen: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
