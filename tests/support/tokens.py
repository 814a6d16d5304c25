"""A tokens file for a test server, and the tokens it stands for."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from kara_sessions_client.client import NO_RETRY, SessionsClient
from kara_sessions_server.domain.clock import Clock
from kara_sessions_server.entrypoints.grpc.server import Settings, start
from kara_sessions_server.entrypoints.grpc.tokens import TokenTable, hash_token, new_token


def write_tokens(path: Path, principals: tuple[str, ...]) -> dict[str, str]:
    tokens = {p: new_token() for p in principals}
    path.write_text(
        "".join(f'[[tokens]]\nprincipal = "{p}"\nsha256 = "{hash_token(t)}"\n\n' for p, t in tokens.items())
    )
    return tokens


@contextmanager
def secured_server(
    database_url: str, clock: Clock, folder: Path, principals: tuple[str, ...]
) -> Iterator[Callable[[str], SessionsClient]]:
    """A server that authenticates, with a token for each of `principals`; yields `as_(principal)`,
    a client calling as that principal (any other name: no credentials at all)."""
    tokens = write_tokens(folder / "tokens.toml", principals)
    running = start(
        Settings(
            listen="127.0.0.1:0", database_url=database_url, tokens=TokenTable.load(folder / "tokens.toml")
        ),
        clock=clock,
    )
    clients: list[SessionsClient] = []

    def as_(principal: str) -> SessionsClient:
        client = SessionsClient(
            f"127.0.0.1:{running.port}", timeout=15, retry=NO_RETRY, token=tokens.get(principal)
        )
        clients.append(client)
        return client

    try:
        yield as_
    finally:
        for client in clients:
            client.close()
        running.stop(grace=1)
