"""Open a nats-py connection from a `Connection` (credentials, NKey, TLS)."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client

from nats_apscheduler.settings import Connection


def connect_options(conn: Connection) -> dict[str, Any]:
    """Keyword arguments for `nats.connect` (reads TLS files to build the SSL context)."""
    options: dict[str, Any] = {
        "servers": [u.strip() for u in conn.url.split(",") if u.strip()],
        "name": conn.name,
        "connect_timeout": conn.timeout,
    }
    if conn.creds:
        options["user_credentials"] = conn.creds
    if conn.user:
        options["user"] = conn.user
    if conn.password:
        options["password"] = conn.password
    if conn.token:
        options["token"] = conn.token
    if conn.nkey:
        options["nkeys_seed"] = conn.nkey
    if conn.tls_ca or conn.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=conn.tls_ca)
        if conn.tls_cert:
            context.load_cert_chain(conn.tls_cert, conn.tls_key)
        options["tls"] = context
    return options


async def connect(
    conn: Connection,
    *,
    error_cb: Callable[[Exception], Awaitable[None]] | None = None,
    disconnected_cb: Callable[[], Awaitable[None]] | None = None,
    reconnected_cb: Callable[[], Awaitable[None]] | None = None,
    closed_cb: Callable[[], Awaitable[None]] | None = None,
    **extra: Any,
) -> Client:
    options = connect_options(conn)
    options.update(extra)
    for key, cb in (
        ("error_cb", error_cb),
        ("disconnected_cb", disconnected_cb),
        ("reconnected_cb", reconnected_cb),
        ("closed_cb", closed_cb),
    ):
        if cb is not None:
            options[key] = cb
    return await nats.connect(**options)
