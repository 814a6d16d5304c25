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

# What a list returns when its caller asks for no page_size, and the most it returns
# (convert.RequestReader.page_size holds requests to them).
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

Key = list[str | int]
Row = TypeVar("Row")


def to_token(text: str) -> str:
    """Opaque to callers: unpadded URL-safe base64 of `text` (the one codec of page tokens and
    event cursors)."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def from_token(token: str) -> str | None:
    """The text `to_token` made `token` from; None for anything else."""
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def _query_digest(query: Sequence[str]) -> str:
    return hashlib.sha256("\x1f".join(query).encode()).hexdigest()[:16]


def encode(query: Sequence[str], key: Key) -> str:
    return to_token(json.dumps({"q": _query_digest(query), "k": key}, separators=(",", ":")))


def decode(query: Sequence[str], token: str, shape: Sequence[type]) -> Key | None:
    """The sort key `token` carries, if `encode` made it for this `query`: a key of `shape`
    (one type per position) whose integers fit a 64-bit column. Anything else, a token edited
    or made up by hand included, is refused as a whole. The tokens are not signed: a key only
    says where in the caller's own list to resume (every filter is authorised on each call),
    so a forged one can skip rows of that list but reach nothing else."""
    if not token:
        return None
    try:
        data = json.loads(from_token(token) or "")
        key = data["k"]
        valid = data["q"] == _query_digest(query) and _has_shape(key, shape)
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise InvalidRequest.single(
            "page_token",
            "is not a page token of this list: pass the next_page_token of the same call with the "
            "same filters, or start again without one",
        )
    return list(key)


_INT64 = range(-(2**63), 2**63)
# Text keys are ids (at most 128 characters); a little slack, no more.
_MAX_KEY_TEXT = 256


def _has_shape(key: object, shape: Sequence[type]) -> bool:
    if not isinstance(key, list) or len(key) != len(shape):
        return False
    for value, kind in zip(key, shape, strict=True):
        # bool is an int to Python, never to a column; a NUL is text no PostgreSQL column holds.
        if type(value) is not kind or (kind is int and value not in _INT64):
            return False
        if isinstance(value, str) and (len(value) > _MAX_KEY_TEXT or "\x00" in value):
            return False
    return True


def cut(
    query: Sequence[str], rows: list[Row], size: int, key: Callable[[Row], Key]
) -> tuple[list[Row], str, Callable[[int], str]]:
    """Given up to size + 1 rows fetched after a token: the page, the token for the next one,
    and how to make the token that resumes after any row of the page (a page cut shorter to
    fit in a message ends there)."""
    page = rows[:size]

    def after(index: int) -> str:
        return encode(query, key(page[index]))

    return page, "" if len(rows) <= size else after(size - 1), after
