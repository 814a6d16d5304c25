"""Opaque page tokens for keyset pagination (never OFFSET, so deep pages cost what the first does).

A token carries the last row's sort key and a digest of the query it belongs to, so a token
reused with a different filter is refused instead of silently skipping rows (AIP-158)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TypeVar

from kara_sessions_server.domain.errors import InvalidRequest

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

Key = list[str | int]
Row = TypeVar("Row")


def page_size(requested: int, default: int = DEFAULT_PAGE_SIZE) -> int:
    """The page size asked for (0: `default`), at most MAX_PAGE_SIZE."""
    if requested < 0:
        raise InvalidRequest.single("page_size", "must not be negative")
    if requested > MAX_PAGE_SIZE:
        raise InvalidRequest.single("page_size", f"must be at most {MAX_PAGE_SIZE}")
    return requested or default


def _query_digest(query: Sequence[str]) -> str:
    return hashlib.sha256("\x1f".join(query).encode()).hexdigest()[:16]


def encode(query: Sequence[str], key: Key) -> str:
    raw = json.dumps({"q": _query_digest(query), "k": key}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(query: Sequence[str], token: str) -> Key | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        key = data["k"]
        valid = data["q"] == _query_digest(query) and isinstance(key, list)
    except (binascii.Error, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise InvalidRequest.single(
            "page_token",
            "is not a token returned by this list call with the same filters; start again without it",
        )
    return list(key)


def cut(query: Sequence[str], rows: list[Row], size: int, key: Callable[[Row], Key]) -> tuple[list[Row], str]:
    """Given up to size + 1 rows fetched after a token, the page and the token for the next one."""
    if len(rows) <= size:
        return rows, ""
    page = rows[:size]
    return page, encode(query, key(page[-1]))
