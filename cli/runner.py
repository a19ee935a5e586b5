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
import re
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import typer

from nats_apscheduler import (
    ApiError,
    ConfigError,
    Connection,
    CronClient,
    NatsCronError,
    NoService,
    SpecError,
    connect,
    parse_duration,
)

from .context import ContextError, load_context, selected_context
from .options import ConnectionFlags, with_connection_flags

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNAVAILABLE = 4
EXIT_DENIED = 5
EXIT_CONFLICT = 6

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
_SECONDS = re.compile(r"\d+(\.\d*)?|\.\d+")


@dataclass(frozen=True)
class Net:
    connection: Connection
    timeout: float


def fail(message: str, code: int) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def parse_timeout(text: str, where: str) -> float:
    """Seconds: a bare number (`2`, `0.5`) or a Go duration (`2s`, `500ms`, `1m`)."""
    text = text.strip()
    try:
        seconds = (
            float(text) if _SECONDS.fullmatch(text) else parse_duration(text, where).total_seconds()
        )
    except SpecError as exc:
        raise ConfigError(
            where, f"{text!r} is not a number of seconds or a duration (2s, 500ms)"
        ) from exc
    if seconds <= 0:
        raise ConfigError(where, f"{text!r} must be positive")
    return seconds


def resolve_connection(
    flags: ConnectionFlags, environ: Mapping[str, str], base: Connection, implicit: bool
) -> Connection:
    """`base` (the NATS_* variables), then a `nats` context laid over it (`--context`,
    else NATS_CONTEXT, else, when `implicit` and NATS_URL is unset, the context chosen
    with `nats context select`), then the flags. Exits 2 on a bad context or timeout."""
    name = flags.context or environ.get("NATS_CONTEXT") or None
    if name is None and implicit and not environ.get("NATS_URL"):
        name = selected_context(environ)
    if name:
        try:
            base = load_context(name, base, environ)
        except ContextError as exc:
            raise fail(str(exc), EXIT_USAGE) from None
    connection = flags.apply(base)
    try:
        if flags.timeout is not None:
            connection = connection.override(timeout=parse_timeout(flags.timeout, "--timeout"))
        elif environ.get("NATS_TIMEOUT"):
            timeout = parse_timeout(environ["NATS_TIMEOUT"], "NATS_TIMEOUT")
            connection = connection.override(timeout=timeout)
        else:
            connection = connection.override(timeout=DEFAULT_TIMEOUT)
    except ConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    return connection


def resolve(flags: ConnectionFlags, environ: Mapping[str, str] = os.environ) -> Net:
    connection = resolve_connection(flags, environ, Connection.from_env(environ), implicit=True)
    return Net(connection, connection.timeout)


def networked(fn: Callable[..., T]) -> Callable[..., T]:
    """Give a command the connection flags; it receives them resolved, as `net: Net`."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.name != "net"]

    @functools.wraps(fn)
    def inner(*args: Any, flags: ConnectionFlags, **kwargs: Any) -> T:
        return fn(*args, net=resolve(flags), **kwargs)

    inner.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*own, inspect.Parameter("flags", inspect.Parameter.KEYWORD_ONLY)]
    )
    inner.__annotations__ = {}
    return with_connection_flags(inner)


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
    except nats.errors.ConnectionClosedError:
        raise fail(f"lost the connection to {net.connection.safe_url}", EXIT_UNAVAILABLE) from None
    except _Closed as exc:
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
    except NatsCronError as exc:
        raise fail(str(exc), EXIT_ERROR) from None


class _Denied(Exception):
    pass


class _Unreachable(Exception):
    pass


class _Closed(Exception):
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
    lost = asyncio.Event()

    async def on_closed() -> None:
        lost.set()

    connecting = loop.create_task(
        connect(net.connection, error_cb=on_error, closed_cb=on_closed, allow_reconnect=False)
    )
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
    # A long-running command (list --watch, history --follow) ends when the connection
    # does: nats-py's own reconnects are off here.
    closed = loop.create_task(lost.wait())
    task: asyncio.Task[T] = loop.create_task(action(CronClient(nc, timeout=net.timeout)))
    try:
        racers: set[asyncio.Future[Any]] = {task, denied, closed}
        done, _ = await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if denied.done():
                raise _Denied(denied.result())
            raise _Closed(f"lost the connection to {net.connection.safe_url}")
        return task.result()
    finally:
        closed.cancel()
        task.cancel()  # interrupted (Ctrl-C): the action ends with us
        with contextlib.suppress(OSError, nats.errors.Error):
            await nc.close()
        await asyncio.gather(task, return_exceptions=True)  # its end, seen by nobody else
