"""A tokens file for a test server, and the tokens it stands for."""

from __future__ import annotations

from pathlib import Path

from kara_sessions_server.entrypoints.grpc.tokens import hash_token, new_token


def write_tokens(path: Path, principals: tuple[str, ...]) -> dict[str, str]:
    tokens = {p: new_token() for p in principals}
    path.write_text(
        "".join(f'[[tokens]]\nprincipal = "{p}"\nsha256 = "{hash_token(t)}"\n\n' for p, t in tokens.items())
    )
    return tokens
