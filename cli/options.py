"""Connection options shared by every networked command (`--server`, credentials, TLS).

Typer has no dependency injection, so each option is an `Annotated` alias that commands
reuse; `apply_flags()` lays the given flags over a base `Connection`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nats_apscheduler import Connection

Server = Annotated[str | None, typer.Option("--server", "-s", help="NATS URL(s) (env NATS_URL).")]
Creds = Annotated[Path | None, typer.Option(help="Credentials file (env NATS_CREDS).")]
User = Annotated[str | None, typer.Option(help="User name (env NATS_USER).")]
Password = Annotated[str | None, typer.Option(help="Password (env NATS_PASSWORD).")]
Token = Annotated[str | None, typer.Option(help="Token (env NATS_TOKEN).")]
Nkey = Annotated[Path | None, typer.Option(help="NKey seed file (env NATS_NKEY).")]
TlsCa = Annotated[Path | None, typer.Option(help="CA certificate (env NATS_CA).")]
TlsCert = Annotated[Path | None, typer.Option(help="Client certificate (env NATS_CERT).")]
TlsKey = Annotated[Path | None, typer.Option(help="Client key (env NATS_KEY).")]


# (parameter name, option) of every connection flag, in the order commands show them.
FLAGS = (
    ("server", Server),
    ("creds", Creds),
    ("user", User),
    ("password", Password),
    ("token", Token),
    ("nkey", Nkey),
    ("tls_ca", TlsCa),
    ("tls_cert", TlsCert),
    ("tls_key", TlsKey),
)


def apply_flags(
    base: Connection,
    server: str | None,
    creds: Path | None,
    user: str | None,
    password: str | None,
    token: str | None,
    nkey: Path | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> Connection:
    """`base` with every flag that was given laid over it."""

    def path(value: Path | None) -> str | None:
        return str(value) if value is not None else None

    return base.override(
        url=server,
        creds=path(creds),
        user=user,
        password=password,
        token=token,
        nkey=path(nkey),
        tls_ca=path(tls_ca),
        tls_cert=path(tls_cert),
        tls_key=path(tls_key),
    )
