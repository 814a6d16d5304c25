"""Every response fits in one message (issue 33). A record is bounded by construction: free text
is capped, a session's moves are capped, an invoice's lines are capped, and a change whose record
would not fit is refused before it commits (service_layer/mutations.py, with `record_bytes`). A
page is cut by size as well as by count: it returns fewer items, with the token that resumes
after the last one, rather than outgrow --max-message-bytes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")


class _Message(Protocol):
    def ByteSize(self) -> int: ...


M = TypeVar("M", bound=_Message)

# What a response holds besides its records (a next_page_token, an event's envelope, the
# account around its ledger entries) and each repeated record's tag and length.
RESERVE_BYTES = 2048
_PER_ITEM_BYTES = 6


def record_bytes(max_message_bytes: int) -> int:
    """The most a record (an event's data, a response's payload) may take."""
    return max_message_bytes - RESERVE_BYTES


def fit(
    items: Sequence[T],
    convert: Callable[[T], M],
    budget: int,
    next_token: str,
    token_after: Callable[[int], str],
) -> tuple[list[M], str]:
    """`items` converted, as many as fit in `budget` bytes (at least one: a record always fits),
    and the token to continue with: `next_token` if all fit, else the one after the last kept."""
    kept: list[M] = []
    size = 0
    for i, item in enumerate(items):
        message = convert(item)
        size += message.ByteSize() + _PER_ITEM_BYTES
        if kept and size > budget:
            return kept, token_after(i - 1)
        kept.append(message)
    return kept, next_token


def fit_all(items: Sequence[T], convert: Callable[[T], M], budget: int) -> list[M]:
    """As `fit`, for a list that resumes from its last item itself (the event feed's cursors)."""
    return fit(items, convert, budget, "", lambda i: "")[0]
