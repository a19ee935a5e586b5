"""Run one API call for a CLI command: connect, call, map every failure to an exit code.

Exit codes (documented in the README and `nats-cron --help`):

    0  success
    1  an unexpected error (a bug: please report it)
    2  usage or validation error (bad flags, an invalid job document or schedule)
    3  not found (no such job)
    4  connection failed, timed out, or no nats-cron instance answered
    5  permission denied by the NATS server
    6  conflict (the job exists already, or kept changing)
"""

import asyncio
import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import nats.errors
import typer

from nats_apscheduler import ApiError, Connection, CronClient, NoService, SpecError, connect

from .context import ContextError, load_context, selected_context
from .options import FLAGS, apply_flags

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 4
EXIT_DENIED = 5
EXIT_CONFLICT = 6

T = TypeVar("T")

ContextName = Annotated[
    str | None,
    typer.Option("--context", help="Use a context of the `nats` CLI (~/.config/nats/context)."),
]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds to wait for a reply.")]


@dataclass(frozen=True)
class Net:
    connection: Connection
    timeout: float


def fail(message: str, code: int) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def resolve(
    server: str | None,
    creds: Any,
    user: str | None,
    password: str | None,
    token: str | None,
    nkey: Any,
    tls_ca: Any,
    tls_cert: Any,
    tls_key: Any,
    context: str | None,
    timeout: float,
) -> Net:
    """Connection settings: environment, then a `nats` context, then flags."""
    base = Connection.from_env(os.environ)
    name = context or (None if os.environ.get("NATS_URL") else selected_context(os.environ))
    if name:
        try:
            base = load_context(name, base, os.environ)
        except ContextError as exc:
            raise fail(str(exc), EXIT_USAGE) from None
    merged = apply_flags(
        base, server, creds, user, password, token, nkey, tls_ca, tls_cert, tls_key
    ).override(timeout=timeout)
    if timeout <= 0:
        raise fail("--timeout must be positive", EXIT_USAGE)
    return Net(merged, timeout)


def networked(fn: Callable[..., T]) -> Callable[..., T]:
    """Give a command the connection flags; it receives them folded into `net: Net`."""
    options: list[tuple[str, Any, Any]] = [(name, option, None) for name, option in FLAGS]
    options += [("context", ContextName, None), ("timeout", Timeout, 5.0)]
    names = [name for name, _, _ in options]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=option)
        for name, option, default in options
    ]
    own = [p for p in inspect.signature(fn).parameters.values() if p.name != "net"]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        conn = {name: kwargs.pop(name) for name in names}
        return fn(*args, net=resolve(**conn), **kwargs)

    wrapper.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {}
    return wrapper


def call(net: Net, action: Callable[[CronClient], Coroutine[Any, Any, T]]) -> T:
    """Connect, run `action`, close; any failure exits with its documented code."""
    try:
        return asyncio.run(_call(net, action))
    except typer.Exit:
        raise
    except ApiError as exc:
        code = {400: EXIT_USAGE, 404: EXIT_NOT_FOUND, 409: EXIT_CONFLICT}.get(
            exc.code, EXIT_UNAVAILABLE if exc.code == 503 else EXIT_ERROR
        )
        raise fail(exc.message, code) from None
    except SpecError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    except NoService as exc:
        raise fail(str(exc), EXIT_UNAVAILABLE) from None
    except _Unreachable as exc:
        raise fail(str(exc), EXIT_UNAVAILABLE) from None
    except _Denied as exc:
        raise fail(f"permission denied by the NATS server: {exc}", EXIT_DENIED) from None
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, nats.errors.NoServersError | OSError):
            detail = f"cannot connect to {net.connection.safe_url}: {detail}"
        raise fail(detail, EXIT_UNAVAILABLE) from None


class _Denied(Exception):
    pass


class _Unreachable(Exception):
    pass


async def _call(net: Net, action: Callable[[CronClient], Coroutine[Any, Any, T]]) -> T:
    loop = asyncio.get_running_loop()
    denied: asyncio.Future[str] = loop.create_future()

    errors: list[Exception] = []
    servers = len(net.connection.url.split(","))
    every_server_failed = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(exc)
        if len(errors) >= servers:
            every_server_failed.set()
        text = str(exc)
        if "permissions violation" in text.lower() and not denied.done():
            denied.set_result(text.removeprefix("nats: "))

    # nats-py retries an initial connect without end: stop at the first round of failures
    # or at the timeout, whichever comes first.
    connecting = loop.create_task(connect(net.connection, error_cb=on_error, allow_reconnect=False))
    failed = loop.create_task(every_server_failed.wait())
    await asyncio.wait(
        {connecting, failed}, timeout=net.timeout, return_when=asyncio.FIRST_COMPLETED
    )
    failed.cancel()
    if not connecting.done() or connecting.exception() is not None:
        connecting.cancel()
        if any("authorization violation" in str(e).lower() for e in errors):
            raise _Denied(f"{net.connection.safe_url} rejected the credentials")
        cause = (
            errors[-1]
            if errors
            else (
                connecting.exception()
                if connecting.done() and not connecting.cancelled()
                else f"no answer within {net.timeout:g}s"
            )
        )
        raise _Unreachable(f"cannot connect to {net.connection.safe_url}: {cause}")
    nc = connecting.result()
    try:
        task: asyncio.Task[T] = loop.create_task(action(CronClient(nc, timeout=net.timeout)))
        racers: set[asyncio.Future[Any]] = {task, denied}
        done, _ = await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise _Denied(denied.result())
        return task.result()
    finally:
        with contextlib.suppress(OSError, nats.errors.Error):
            await nc.close()
