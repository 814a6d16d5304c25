"""Who is asking: an authenticated caller, as the domain and the audit log know it. How a
caller proves who it is (bearer tokens) is the entrypoint's business; what it may do is the
service layer's (authz.py)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

_ID = re.compile(r"[!-~]{1,128}")


class Role(enum.StrEnum):
    SERVICE = "service"
    PROFESSIONAL = "professional"
    CLIENT = "client"
    # A programme's sponsor (issue 37): its programme and that programme's report, nothing else.
    SPONSOR = "sponsor"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a trusted internal service (acting for anyone it names), or
    one professional, or one client, or one programme's sponsor."""

    role: Role
    id: str = ""

    def __str__(self) -> str:
        return f"{self.role}:{self.id}" if self.id else str(self.role)

    @classmethod
    def parse(cls, text: str) -> Principal:
        """`service`, `service:NAME`, `professional:ID`, `client:ID` or `sponsor:PROGRAMME_ID`."""
        role_text, _, ident = text.partition(":")
        try:
            role = Role(role_text)
        except ValueError:
            raise ValueError(
                f"{text!r} is not a principal: use service, service:NAME, professional:ID, client:ID or "
                "sponsor:PROGRAMME_ID"
            ) from None
        if (ident and not _ID.fullmatch(ident)) or (not ident and role is not Role.SERVICE):
            raise ValueError(f"{text!r}: the id after {role_text}: must be 1-128 printable characters")
        return cls(role, ident)

    @property
    def is_service(self) -> bool:
        return self.role is Role.SERVICE


# Every caller when the server runs without authentication (development on loopback only).
UNAUTHENTICATED_SERVICE = Principal(Role.SERVICE, "unauthenticated")
