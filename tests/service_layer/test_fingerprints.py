"""A request_id's fingerprint is drawn from the request's command, field by field (issue 34):
the fingerprints stored by earlier versions still match, a field added with a default changes
none, and a change to any one field changes it. tests/api/test_request_id_reuse.py shows the
same through the API, for every field of every mutation, generated from the descriptors."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kara_sessions_server.domain import model
from kara_sessions_server.domain.model import (
    BookSession,
    CancelSession,
    ChangeInvoiceLines,
    CompleteSession,
    CreateInvoice,
    CreateProgramme,
    GrantCredits,
    MarkNoShow,
    Party,
    RescheduleSession,
    SubmitInvoice,
    UpdateProgramme,
    WaiveCharge,
)
from kara_sessions_server.domain.principal import Principal, Role
from kara_sessions_server.domain.programme import LateReschedule, ProgrammeChanges, Terms
from kara_sessions_server.service_layer.fingerprints import fingerprint, legacy_fingerprint

WHO = Principal(Role.PROFESSIONAL, "pro-1")
T = datetime(2027, 3, 1, 9, 30, tzinfo=UTC)
TERMS_48H = Terms(timedelta(hours=48), True, False)

# Each request as 0.10.0 fingerprinted it, and the fingerprint it stored (computed by 0.10.0's
# hand-made parameter lists, before they were replaced).
STORED_BY_0_10: dict[str, tuple[str, object, str]] = {
    "book": (
        "BookSession",
        BookSession("c1", "pro-1", T, "r"),
        "fef79623b181b4e64f5fe86a78ab4a562c82d33e3a75401047305e9113d792ee",
    ),
    "book_prog": (
        "BookSession",
        BookSession("c1", "pro-1", T, "r", "p48"),
        "9bc52dbd5e1fdf83d13fcea6cc64eff2775fc763784352a9c6b828179f02af94",
    ),
    "cancel": (
        "CancelSession",
        CancelSession("s1", Party.CLIENT, False, None, "", "r"),
        "cbd30224b631eaa5557b325101ffb8721f87936150c9030273e2e365d4ece788",
    ),
    "cancel_full": (
        "CancelSession",
        CancelSession("s1", Party.PROFESSIONAL, True, T, "emailed late", "r"),
        "927cdc073fb2fca25e76be7b212497621320e38d4ac14e4eff7d16ed59be336c",
    ),
    "reschedule": (
        "RescheduleSession",
        RescheduleSession("s1", T, Party.CLIENT, False, None, "r", "rid"),
        "a60393cc489bf2183793b84909b1de2306927d883282a147ef63f22bccfa3d37",
    ),
    "complete": (
        "CompleteSession",
        CompleteSession("s1", "r"),
        "90944512bc9d8f1a171886dba0431f6684c8c2cabbcca5c974bfab1c56ecb1b3",
    ),
    "no_show": (
        "MarkNoShow",
        MarkNoShow("s1", "r"),
        "a6d268f1ba529ce46fc23f94d3a879486469c6f65520c3732285b39f7d68dec8",
    ),
    "waive": (
        "WaiveCharge",
        WaiveCharge("s1", "goodwill", "r"),
        "f5ccd155ee8d16d0d744e7fbeaa6dfc282d4cc170fdc04e95cd882e61f821ac1",
    ),
    "grant": (
        "GrantCredits",
        GrantCredits("c1", 3, "r"),
        "6d6af520b94996b6b8ace582713db86b54cb9e7cd5722ce45e5b129406df32f1",
    ),
    "grant_prog": (
        "GrantCredits",
        GrantCredits("c1", 3, "r", "p48"),
        "77d858cb818c3b2100ac33b05987c8f64dc19d2aa1dde8c6b14155592d66fe97",
    ),
    "invoice": (
        "CreateInvoice",
        CreateInvoice("pro-1", ("s1", "s2"), None, "r"),
        "d57f1ccd33fc0c1e8a77a42ed0443a39ac39ad45cdff3c406d55184c362dbc37",
    ),
    "invoice_up_to": (
        "CreateInvoice",
        CreateInvoice("pro-1", (), T, "r"),
        "9b5f2a0580c6c4db8c64f0d71bbf1397be4d4fd2295396bb9f560b8f9c20ed83",
    ),
    "add": (
        "AddToInvoice",
        ChangeInvoiceLines("i1", ("s3",), "r"),
        "0e41802f9bdb40b5f0e13122f40e6dae40ea216208484669d4d635ec24db6420",
    ),
    "remove": (
        "RemoveFromInvoice",
        ChangeInvoiceLines("i1", ("s3",), "r"),
        "990cec4aed439a8f53002311bf31ba67576c57d369d9b605735a46d1c7139ecf",
    ),
    "submit": (
        "SubmitInvoice",
        SubmitInvoice("i1", "r"),
        "3237ee757560ffe0841e89512d5528f86686d1523cea5d91d0aa3b0dbc775778",
    ),
    "create_programme": (
        "CreateProgramme",
        CreateProgramme("p48", "P", TERMS_48H, "r"),
        "5204fee71fedb83311c10e29635fe80a97955dd56103d445be2daa01aab8f951",
    ),
    "update_programme": (
        "UpdateProgramme",
        UpdateProgramme("p48", ProgrammeChanges(notice_window=timedelta(hours=72)), "r"),
        "4bf18ca779f5edb383bd86c0a9e87b6d5da3149c74ba42a7190fe78dc45beaf0",
    ),
    "update_programme_etag": (
        "UpdateProgramme",
        UpdateProgramme("p48", ProgrammeChanges(display_name="Q"), "r", etag="v3"),
        "6a2b1fd0aaf8d7e76e05b3932f813d28f685ad9b83b6bab77131240e636001bf",
    ),
}
# Their records held the programme's terms or changes as a repr; those match the legacy form.
NESTED = {"create_programme", "update_programme", "update_programme_etag"}


@pytest.mark.parametrize("name", sorted(STORED_BY_0_10))
def test_a_retry_across_the_upgrade_matches_what_0_10_stored(name: str) -> None:
    operation, request, stored = STORED_BY_0_10[name]
    matching = legacy_fingerprint if name in NESTED else fingerprint
    assert matching(operation, request, WHO) == stored


def test_every_mutation_command_is_covered_here() -> None:
    commands = {type(request) for _, request, _ in STORED_BY_0_10.values()}
    declared = {
        cls
        for cls in vars(model).values()
        if isinstance(cls, type)
        and dataclasses.is_dataclass(cls)
        and "request_id" in cls.__dataclass_fields__
    }
    declared.remove(model.LedgerEntry)  # a record of what a request did, not a request
    # The server's own changes (issue 36), whose request_id names what they change: no caller
    # sends one, and 0.10.0 stored none.
    declared -= {model.SettleUnmarked, model.ExpireCredits}
    assert commands == declared


def test_a_field_added_later_with_its_default_changes_no_fingerprint() -> None:
    for operation, request, _ in STORED_BY_0_10.values():
        cls: Any = type(request)
        grown = dataclasses.make_dataclass(
            cls.__name__, [("added_later", int, dataclasses.field(default=0))], bases=(cls,), frozen=True
        )
        values = {f.name: getattr(request, f.name) for f in dataclasses.fields(cls)}
        assert fingerprint(operation, grown(**values), WHO) == fingerprint(operation, request, WHO)
        assert fingerprint(operation, grown(**values, added_later=1), WHO) != fingerprint(
            operation, request, WHO
        )
    # Inside a nested record too: a programme's terms gaining a term with its default.
    grown_terms = dataclasses.make_dataclass(
        "Terms", [("max_reschedules", int, dataclasses.field(default=0))], bases=(Terms,), frozen=True
    )
    as_before = CreateProgramme("p48", "P", grown_terms(timedelta(hours=48), True, False), "r")
    assert fingerprint("CreateProgramme", as_before, WHO) == fingerprint(
        "CreateProgramme", CreateProgramme("p48", "P", TERMS_48H, "r"), WHO
    )


def _other(value: Any) -> Any:
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, Party):
        return Party.PROFESSIONAL if value is Party.CLIENT else Party.CLIENT
    if isinstance(value, LateReschedule):
        return LateReschedule.FREE if value is LateReschedule.CHARGE else LateReschedule.CHARGE
    if isinstance(value, datetime):
        return value + timedelta(minutes=1)
    if isinstance(value, timedelta):
        return value + timedelta(minutes=1)
    if isinstance(value, tuple):
        return (*value, "s-other")
    if value is None:
        return T
    raise AssertionError(f"no other value for {value!r}")


def _changed_one_field(record: Any) -> list[tuple[str, Any]]:
    """`record` with each one of its fields changed (inside a nested record, each of its)."""
    variants = []
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if dataclasses.is_dataclass(value):
            nested = [(f"{f.name}.{name}", v) for name, v in _changed_one_field(value)]
            variants += [(name, dataclasses.replace(record, **{f.name: v})) for name, v in nested]
        else:
            variants.append((f.name, dataclasses.replace(record, **{f.name: _other(value)})))
    return variants


@pytest.mark.parametrize("name", sorted(STORED_BY_0_10))
def test_any_one_field_changed_is_another_request_and_only_the_request_id_is_not(name: str) -> None:
    operation, request, _ = STORED_BY_0_10[name]
    first = fingerprint(operation, request, WHO)
    for field, variant in _changed_one_field(request):
        same = fingerprint(operation, variant, WHO) == first
        assert same == (field == "request_id"), field
    assert fingerprint(operation, request, Principal(Role.SERVICE)) != first
