"""Security: the accounts of deploy/nats/auth.conf, and TLS with client certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nats_apscheduler.embedded import EmbeddedNatsServer
from tests.helpers.cluster import ServeProcess

AUTH_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nats" / "auth.conf"
PASSWORDS = {
    "NATS_CRON_SCHEDULER_PASSWORD": "sched-Pw-1x9",
    "NATS_CRON_ADMIN_PASSWORD": "admin-Pw-7q2",
    "NATS_CRON_READER_PASSWORD": "reader-Pw-3k5",
}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    return subprocess.run(
        [sys.executable, "-m", "nats_cron_cli", *args],
        env={**base, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    saved = {k: os.environ.get(k) for k in PASSWORDS}
    os.environ.update(PASSWORDS)  # nats-server reads the passwords from its environment
    try:
        server = EmbeddedNatsServer(tmp_path_factory.mktemp("auth-js"), config_file=AUTH_CONF)
        server.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scheduler(auth_server: EmbeddedNatsServer) -> Iterator[ServeProcess]:
    proc = ServeProcess(
        "secure-1",
        {
            "NATS_URL": auth_server.url,
            "NATS_USER": "scheduler",
            "NATS_PASSWORD": PASSWORDS["NATS_CRON_SCHEDULER_PASSWORD"],
        },
    )
    proc.wait_for("won the lease", timeout=20)
    yield proc
    proc.stop()


def as_user(server: EmbeddedNatsServer, user: str) -> list[str]:
    password = PASSWORDS[f"NATS_CRON_{user.upper()}_PASSWORD"]
    return ["--server", server.url, "--user", user, "--password", password]


def test_admin_manages_jobs(auth_server: EmbeddedNatsServer, scheduler: ServeProcess) -> None:
    admin = as_user(auth_server, "admin")
    assert cli("add", "jobs.admin", "30s", *admin).returncode == 0
    assert cli("pause", "jobs.admin", *admin).returncode == 0
    assert cli("resume", "jobs.admin", *admin).returncode == 0
    assert cli("trigger", "jobs.admin", *admin).returncode == 0
    assert cli("delete", "jobs.admin", *admin).returncode == 0
    assert cli("instances", *admin).returncode == 0


@pytest.mark.parametrize(
    "command",
    [
        ["add", "jobs.reader", "30s"],
        ["update", "jobs.reader", "30s"],
        ["delete", "jobs.seeded"],
        ["delete", "jobs.>", "--yes"],
        ["pause", "jobs.seeded"],
        ["resume", "jobs.seeded"],
        ["trigger", "jobs.seeded"],
    ],
)
def test_reader_cannot_change_anything(
    auth_server: EmbeddedNatsServer, scheduler: ServeProcess, command: list[str]
) -> None:
    admin = as_user(auth_server, "admin")
    cli("update", "jobs.seeded", "1h", *admin)
    result = cli(*command, *as_user(auth_server, "reader"))
    assert result.returncode == 5, result.stderr
    assert "permission denied" in result.stderr and "nats-cron.jobs." in result.stderr
    assert PASSWORDS["NATS_CRON_READER_PASSWORD"] not in result.stderr + result.stdout
    assert result.stdout == ""
    # Nothing changed: the seeded job is still there and not paused.
    got = cli("get", "jobs.seeded", "--json", *admin)
    assert got.returncode == 0 and '"paused": false' in got.stdout


def test_reader_can_look(auth_server: EmbeddedNatsServer, scheduler: ServeProcess) -> None:
    cli("update", "jobs.visible", "1h", *as_user(auth_server, "admin"))
    reader = as_user(auth_server, "reader")
    for command in (["list"], ["get", "jobs.visible"], ["status"], ["history", "jobs.visible"]):
        result = cli(*command, *reader)
        assert result.returncode == 0, (command, result.stderr)


def test_scheduler_logs_hold_no_password(scheduler: ServeProcess) -> None:
    logs = "".join(scheduler.raw)
    assert logs and all(secret not in logs for secret in PASSWORDS.values())


# --- TLS with verified client certificates --------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    ca_key = _key()
    ca = _cert("nats-cron test CA", ca_key, None, ca_key, ca=True)
    _write(directory / "ca", ca, None)
    server_key = _key()
    _write(
        directory / "server", _cert("localhost", server_key, ca, ca_key, server=True), server_key
    )
    client_key = _key()
    _write(directory / "client", _cert("nats-cron", client_key, ca, ca_key), client_key)
    return directory


@pytest.fixture(scope="module")
def tls_server(
    certs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedNatsServer]:
    server = EmbeddedNatsServer(
        tmp_path_factory.mktemp("tls-js"),
        extra_args=[
            "--tlsverify",
            "--tlscert",
            str(certs / "server.pem"),
            "--tlskey",
            str(certs / "server.key"),
            "--tlscacert",
            str(certs / "ca.pem"),
        ],
    )
    server.start()
    yield server
    server.stop()


def test_tls_with_client_certificates(certs: Path, tls_server: EmbeddedNatsServer) -> None:
    url = f"tls://127.0.0.1:{tls_server.port}"
    tls_env = {
        "NATS_URL": url,
        "NATS_CA": str(certs / "ca.pem"),
        "NATS_CERT": str(certs / "client.pem"),
        "NATS_KEY": str(certs / "client.key"),
    }
    service = ServeProcess("tls-1", tls_env)
    try:
        service.wait_for("won the lease", timeout=20)
        flags = [
            "--server",
            url,
            "--tls-ca",
            str(certs / "ca.pem"),
            "--tls-cert",
            str(certs / "client.pem"),
            "--tls-key",
            str(certs / "client.key"),
        ]
        assert cli("add", "tls.job", "30s", *flags).returncode == 0
        status = cli("status", "--json", *flags)
        assert status.returncode == 0 and '"instance_id": "tls-1"' in status.stdout
        # The nats CLI's spellings, given before the command (global options).
        nats_style = [
            "--server",
            url,
            "--tlsca",
            str(certs / "ca.pem"),
            "--tlscert",
            str(certs / "client.pem"),
            "--tlskey",
            str(certs / "client.key"),
        ]
        listed = cli(*nats_style, "list", "--json")
        assert listed.returncode == 0 and '"tls.job"' in listed.stdout, listed.stderr
        # The server verifies clients: without a client certificate there is no connection.
        refused = cli(
            "status", "--server", url, "--tls-ca", str(certs / "ca.pem"), "--timeout", "3"
        )
        assert refused.returncode == 4, refused.stderr
        assert refused.stderr.startswith("error:")
    finally:
        service.stop()
