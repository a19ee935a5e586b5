"""Connection options (`--server`, `--context`, credentials, TLS, `--timeout`): global, as
in the `nats` CLI, so they go before or after the command.

The root command declares them (its `--help` shows them once); every command that
connects declares them again, hidden, so that `nats-cron list -s URL` works as well as
`nats-cron -s URL list`. A value given after the command wins over one given before.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from nats_apscheduler import Connection

T = TypeVar("T")

PANEL = "Connection (also after the command)"


@dataclass(frozen=True)
class ConnectionFlags:
    """The connection flags given on the command line (None: not given)."""

    server: str | None = None
    context: str | None = None
    creds: Path | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    timeout: str | None = None

    def over(self, base: ConnectionFlags | None) -> ConnectionFlags:
        """These flags laid over `base` (the ones given before the command)."""
        if base is None:
            return self
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(base, **{k: v for k, v in given.items() if v is not None})

    def apply(self, base: Connection) -> Connection:
        """`base` with every given flag laid over it (the context and timeout aside)."""

        def path(value: Path | None) -> str | None:
            return str(value) if value is not None else None

        return base.override(
            url=self.server,
            creds=path(self.creds),
            user=self.user,
            password=self.password,
            token=self.token,
            nkey=path(self.nkey),
            tls_ca=path(self.tls_ca),
            tls_cert=path(self.tls_cert),
            tls_key=path(self.tls_key),
        )


def _options(hidden: bool) -> list[tuple[str, Any]]:
    """(parameter name, Annotated option) of every connection flag, in help order."""

    def option(*names: str, help: str, kind: Any = str) -> Any:
        return Annotated[
            kind | None,
            typer.Option(
                *names, help=help, hidden=hidden, rich_help_panel=PANEL, show_default=False
            ),
        ]

    return [
        ("server", option("--server", "-s", help="NATS URL(s), comma-separated (env NATS_URL).")),
        (
            "context",
            option(
                "--context",
                help="A context of the `nats` CLI, by name or .json path (env NATS_CONTEXT).",
            ),
        ),
        ("creds", option("--creds", help="Credentials file (env NATS_CREDS).", kind=Path)),
        ("user", option("--user", help="User name (env NATS_USER).")),
        ("password", option("--password", help="Password (env NATS_PASSWORD).")),
        ("token", option("--token", help="Token (env NATS_TOKEN).")),
        ("nkey", option("--nkey", help="NKey seed file (env NATS_NKEY).", kind=Path)),
        (
            "tls_ca",
            option("--tlsca", "--tls-ca", help="TLS CA certificate (env NATS_CA).", kind=Path),
        ),
        (
            "tls_cert",
            option(
                "--tlscert", "--tls-cert", help="TLS client certificate (env NATS_CERT).", kind=Path
            ),
        ),
        (
            "tls_key",
            option("--tlskey", "--tls-key", help="TLS client key (env NATS_KEY).", kind=Path),
        ),
        (
            "timeout",
            option(
                "--timeout",
                help="How long to wait for NATS: seconds or a duration, e.g. 2s, 500ms "
                "(env NATS_TIMEOUT; default 5s).",
            ),
        ),
    ]


ROOT_OPTIONS = _options(hidden=False)
_CTX = "typer_context_"
NAMES = [name for name, _ in ROOT_OPTIONS]


def root_flags(ctx: typer.Context | None) -> ConnectionFlags | None:
    """The connection flags given before the command (stored by the root callback)."""
    obj = ctx.find_root().obj if ctx is not None else None
    return obj if isinstance(obj, ConnectionFlags) else None


def with_connection_flags(fn: Callable[..., T]) -> Callable[..., T]:
    """Give a command the (hidden) connection flags; it receives them, merged with those
    given before the command, as `flags: ConnectionFlags`."""
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option)
        for name, option in _options(hidden=True)
    ]
    # Typer passes the click context to a parameter of this type (it is no option).
    extra.append(inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "flags"]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        ctx = kwargs.pop(_CTX, None)
        given = ConnectionFlags(**{name: kwargs.pop(name) for name in NAMES})
        return fn(*args, flags=given.over(root_flags(ctx)), **kwargs)

    wrapper.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {}
    return wrapper


def root_signature(fn: Callable[..., T]) -> Callable[..., T]:
    """Give the root callback the visible connection flags; it receives them as
    `flags: ConnectionFlags`."""
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option)
        for name, option in ROOT_OPTIONS
    ]
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "flags"]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        flags = ConnectionFlags(**{name: kwargs.pop(name) for name in NAMES})
        return fn(*args, flags=flags, **kwargs)

    wrapper.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {}
    return wrapper
