"""TLS and mutual TLS between SessionsClient (and the CLI) and the server, with certificates
generated here."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kara_sessions_client.client import NO_RETRY, TLS, KaraError, SessionsClient
from kara_sessions_server.entrypoints.grpc.server import RunningServer, Settings, start


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _issue(name: str, issuer: Pem | None, *, ca: bool = False, server: bool = False) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert = x509.load_pem_x509_certificate(issuer.cert) if issuer else None
    issuer_key = serialization.load_pem_private_key(issuer.key, None) if issuer else key
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    return Pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


@pytest.fixture(scope="module")
def pki() -> dict[str, Pem]:
    ca = _issue("kara test CA", None, ca=True)
    return {
        "ca": ca,
        "server": _issue("localhost", ca, server=True),
        "client": _issue("workstation-backend", ca),
        "stranger": _issue("stranger", _issue("other CA", None, ca=True)),
    }


@pytest.fixture
def tls_server(
    tmp_path: Path, pki: dict[str, Pem], request: pytest.FixtureRequest
) -> Iterator[RunningServer]:
    mutual = getattr(request, "param", False)
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'tls.db'}",
        tls_cert=pki["server"].cert,
        tls_key=pki["server"].key,
        client_ca=pki["ca"].cert if mutual else None,
    )
    running = start(settings)
    yield running
    running.stop(1)


def test_tls_client_talks_to_a_tls_server(tls_server: RunningServer, pki: dict[str, Pem]) -> None:
    with SessionsClient(f"127.0.0.1:{tls_server.port}", tls=TLS(root_certificates=pki["ca"].cert)) as kara:
        assert kara.grant_credits("c", 2).available == 2
    plaintext = SessionsClient(f"127.0.0.1:{tls_server.port}", timeout=2, retry=NO_RETRY)
    with plaintext, pytest.raises(KaraError) as refused:
        plaintext.get_credit_account("c")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_server_signed_by_another_ca_is_not_trusted(tls_server: RunningServer, pki: dict[str, Pem]) -> None:
    other = TLS(root_certificates=pki["stranger"].cert)
    kara = SessionsClient(f"127.0.0.1:{tls_server.port}", timeout=2, retry=NO_RETRY, tls=other)
    with kara, pytest.raises(KaraError) as refused:
        kara.get_credit_account("c")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("tls_server", [True], indirect=True, ids=["mutual"])
def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    tls_server: RunningServer, pki: dict[str, Pem]
) -> None:
    target = f"127.0.0.1:{tls_server.port}"
    ca = pki["ca"].cert
    good = TLS(ca, pki["client"].cert, pki["client"].key)
    with SessionsClient(target, tls=good) as kara:
        assert kara.grant_credits("c", 1).available == 1
    for tls in (TLS(ca), TLS(ca, pki["stranger"].cert, pki["stranger"].key)):
        client = SessionsClient(target, timeout=2, retry=NO_RETRY, tls=tls)
        with client, pytest.raises(KaraError) as refused:
            client.get_credit_account("c")
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("tls_server", [True], indirect=True, ids=["mutual"])
def test_cli_connects_with_mutual_tls(tls_server: RunningServer, pki: dict[str, Pem], tmp_path: Path) -> None:
    for name, pem in (
        ("ca.pem", pki["ca"].cert),
        ("me.pem", pki["client"].cert),
        ("me.key", pki["client"].key),
    ):
        (tmp_path / name).write_bytes(pem)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "kara_sessions_client.cli",
            "--target",
            f"127.0.0.1:{tls_server.port}",
            "--ca-file",
            str(tmp_path / "ca.pem"),
            "--cert-file",
            str(tmp_path / "me.pem"),
            "--key-file",
            str(tmp_path / "me.key"),
            "--json",
            "credits",
            "grant",
            "c",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert '"available": 3' in out.stdout


def test_half_a_tls_configuration_is_refused_at_start(tmp_path: Path, pki: dict[str, Pem]) -> None:
    with pytest.raises(ValueError, match="both"):
        start(
            Settings(
                listen="127.0.0.1:0",
                database_url=f"sqlite:///{tmp_path / 'x.db'}",
                tls_cert=pki["server"].cert,
            )
        )
