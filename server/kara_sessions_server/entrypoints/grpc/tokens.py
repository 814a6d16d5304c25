"""Bearer tokens and the principals they stand for. The tokens file holds SHA-256 hashes only,
so a leaked file lets nobody in; a presented token is compared with every hash in constant time.

    # tokens.toml
    [[tokens]]
    principal = "service:workstation"       # service, service:NAME, professional:ID, client:ID
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

`kara-sessions token new PRINCIPAL` makes a token and prints the entry to add."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from kara_sessions_server.domain.principal import Principal

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


class TokenFileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TokenTable:
    entries: tuple[tuple[bytes, Principal], ...]

    def principal_for(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        # No early exit: the time taken says nothing about which entry matched, or how closely.
        for known, principal in self.entries:
            if hmac.compare_digest(known, digest):
                found = principal
        return found

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise TokenFileError(f"tokens file {path}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise TokenFileError(f"tokens file {path} is not valid TOML: {exc}") from exc
        unknown = set(data) - {"tokens"}
        if unknown:
            raise TokenFileError(f"tokens file {path}: unknown keys {sorted(unknown)}; expected [[tokens]]")
        entries: list[tuple[bytes, Principal]] = []
        seen: set[str] = set()
        for n, item in enumerate(data.get("tokens", []), start=1):
            where = f"tokens file {path}, entry {n}"
            if not isinstance(item, dict) or set(item) - {"principal", "sha256", "note"}:
                raise TokenFileError(f"{where}: an entry has principal, sha256 and an optional note")
            digest = str(item.get("sha256", "")).lower()
            if not _HEX_SHA256.fullmatch(digest):
                raise TokenFileError(f"{where}: sha256 must be 64 hex digits (the token's SHA-256)")
            if digest in seen:
                raise TokenFileError(f"{where}: the same token hash is listed twice")
            seen.add(digest)
            try:
                principal = Principal.parse(str(item.get("principal", "")))
            except ValueError as exc:
                raise TokenFileError(f"{where}: {exc}") from None
            entries.append((bytes.fromhex(digest), principal))
        if not entries:
            raise TokenFileError(f"tokens file {path} lists no tokens; nobody could call the server")
        return cls(tuple(entries))
