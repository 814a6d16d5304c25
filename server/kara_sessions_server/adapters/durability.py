"""What the database promises about a commit it has acknowledged, read back from the database
itself (not from our configuration), and whether a power loss or crash could take it back."""

from __future__ import annotations

from dataclasses import dataclass

from kara_sessions_server.adapters.storage import Storage

# PRAGMA synchronous answers with a number.
_SQLITE_SYNCHRONOUS = {0: "off", 1: "normal", 2: "full", 3: "extra"}


@dataclass(frozen=True, slots=True)
class Durability:
    database: str
    settings: dict[str, str]
    # Each: how an acknowledged change could be lost with these settings. Empty: none known.
    risks: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.database} " + " ".join(f"{k}={v}" for k, v in self.settings.items())


def inspect(storage: Storage) -> Durability:
    storage.db.connect(reuse_if_open=True)
    try:
        if storage.is_sqlite:
            return _sqlite(storage)
        return _postgresql(storage)
    finally:
        storage.release()


def _one(storage: Storage, statement: str) -> str:
    row = storage.db.execute_sql(statement).fetchone()
    return str(row[0]).lower()


def _sqlite(storage: Storage) -> Durability:
    journal = _one(storage, "PRAGMA journal_mode")
    synchronous = _SQLITE_SYNCHRONOUS.get(int(_one(storage, "PRAGMA synchronous")), "unknown")
    risks = []
    if journal in ("off", "memory"):
        risks.append(f"journal_mode={journal}: a crash during a commit can corrupt the database")
    if synchronous == "off":
        risks.append("synchronous=off: a power loss or OS crash can lose commits or corrupt the database")
    elif synchronous == "normal" and journal == "wal":
        risks.append(
            "synchronous=normal in WAL mode: a commit acknowledged to a caller may roll back after a "
            "power loss or OS crash (use --sqlite-synchronous full)"
        )
    elif synchronous == "normal":
        risks.append("synchronous=normal: a power loss at the wrong moment can corrupt the database")
    return Durability("sqlite", {"journal_mode": journal, "synchronous": synchronous}, tuple(risks))


def _postgresql(storage: Storage) -> Durability:
    settings = {
        name: _one(storage, f"SHOW {name}") for name in ("synchronous_commit", "fsync", "full_page_writes")
    }
    risks = []
    if settings["fsync"] == "off":
        risks.append("fsync=off: a power loss or OS crash can lose commits or corrupt the cluster")
    if settings["synchronous_commit"] == "off":
        risks.append(
            "synchronous_commit=off: a commit acknowledged to a caller may be lost if the server "
            "crashes within the WAL writer's delay"
        )
    if settings["full_page_writes"] == "off":
        risks.append("full_page_writes=off: a power loss can leave torn pages the WAL cannot repair")
    return Durability("postgresql", settings, tuple(risks))
