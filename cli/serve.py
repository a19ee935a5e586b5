"""`nats-cron serve`: run one scheduler instance (optionally with an embedded nats-server)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import typer
from loguru import logger

from nats_apscheduler import (
    ConfigError,
    DataDirInUse,
    EmbeddedNatsServer,
    NatsCron,
    NatsCronError,
    Settings,
    SpecError,
    __version__,
    parse_duration,
)
from nats_apscheduler import configure_logging as configure

from .options import ConnectionFlags, with_connection_flags
from .runner import resolve_connection

EXIT_FATAL = 1
EXIT_CONFIG = 2


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "nats-cron" / "embedded"


def _duration(text: str | None, name: str) -> timedelta | None:
    if text is None:
        return None
    try:
        value = parse_duration(text, name)
    except SpecError as exc:  # a duration's own rule, reported as the flag's
        raise ConfigError(exc.field, exc.rule) from None
    if value <= timedelta(0):
        raise ConfigError(name, f"{text!r} must be positive")
    return value


@with_connection_flags
def serve(
    instance_id: str | None = typer.Option(
        None, help="Instance id (env INSTANCE_ID, default: hostname)."
    ),
    log_level: str | None = typer.Option(None, help="debug, info, warn or error (env LOG_LEVEL)."),
    log_format: str | None = typer.Option(
        None,
        help="text or json (env NATS_CRON_LOG_FORMAT; default: text on a terminal, else JSON).",
    ),
    jobs_bucket: str | None = typer.Option(
        None, help="KV bucket of the jobs (env NATS_CRON_JOBS_BUCKET)."
    ),
    leader_bucket: str | None = typer.Option(
        None, help="KV bucket of the lease (env NATS_CRON_LEADER_BUCKET)."
    ),
    events_stream: str | None = typer.Option(
        None,
        "--events-stream",
        "--history-stream",
        help="Stream of the run events, the history (env NATS_CRON_EVENTS_STREAM).",
    ),
    events_prefix: str | None = typer.Option(
        None,
        help="Events go to PREFIX.<job subject> (env NATS_CRON_EVENTS_PREFIX, "
        "default nats-cron.events).",
    ),
    replicas: int | None = typer.Option(
        None, help="Replicas of buckets and stream (env NATS_CRON_REPLICAS)."
    ),
    lease_ttl: str | None = typer.Option(
        None, help="Lease TTL, whole seconds, e.g. 3s (env NATS_CRON_LEASE_TTL)."
    ),
    grace: str | None = typer.Option(
        None, help="Default grace window for missed runs (env NATS_CRON_GRACE)."
    ),
    min_interval: str | None = typer.Option(
        None, help="Smallest `every` allowed (env NATS_CRON_MIN_INTERVAL)."
    ),
    events_depth: int | None = typer.Option(
        None,
        "--events-depth",
        "--history-depth",
        help="Events kept per job (env NATS_CRON_EVENTS_DEPTH).",
    ),
    max_in_flight: int | None = typer.Option(
        None,
        help="Requests and JetStream publishes awaiting a reply, at most "
        "(env NATS_CRON_MAX_IN_FLIGHT, 10000).",
    ),
    shards: int | None = typer.Option(
        None,
        help="Shards the jobs are spread over, fixed per deployment (env NATS_CRON_SHARDS, 1).",
    ),
    http_port: int | None = typer.Option(
        None,
        help="Serve the dashboard, its API, /metrics, /healthz and /readyz on this port "
        "(env NATS_CRON_HTTP_PORT; 0: any free port). Token: env NATS_CRON_HTTP_TOKEN.",
    ),
    http_host: str | None = typer.Option(
        None, help="Address of the HTTP listener (env NATS_CRON_HTTP_HOST, default 127.0.0.1)."
    ),
    metrics_port: int | None = typer.Option(
        None, help="The same as --http-port (its former name; env NATS_CRON_METRICS_PORT)."
    ),
    metrics_host: str | None = typer.Option(
        None, help="The same as --http-host (its former name; env NATS_CRON_METRICS_HOST)."
    ),
    metrics_subjects: bool | None = typer.Option(
        None,
        "--metrics-subjects/--no-metrics-subjects",
        help="Per-job series in /metrics (env NATS_CRON_METRICS_SUBJECTS, default on; off "
        "for very many jobs).",
        show_default=False,
    ),
    embedded: bool = typer.Option(
        False, "--embedded", help="Start a local nats-server with JetStream too."
    ),
    data_dir: Path | None = typer.Option(
        None,
        help="Embedded server's JetStream directory (default: ~/.local/share/nats-cron/embedded).",
    ),
    embedded_port: int = typer.Option(
        4222, help="Embedded server's client port (0: any free port)."
    ),
    *,
    flags: ConnectionFlags,
) -> None:
    """Run a scheduler instance: elects a leader, fires jobs, serves the API.

    Example: nats-cron serve --embedded
    """
    try:
        settings = Settings.from_env(os.environ).override(
            instance_id=instance_id,
            log_level=log_level.lower() if log_level else None,
            log_format=log_format.lower() if log_format else None,
            jobs_bucket=jobs_bucket,
            leader_bucket=leader_bucket,
            events_stream=events_stream,
            events_prefix=events_prefix,
            replicas=replicas,
            lease_ttl=_duration(lease_ttl, "--lease-ttl"),
            grace=_duration(grace, "--grace"),
            min_interval=_duration(min_interval, "--min-interval"),
            events_depth=events_depth,
            max_in_flight=max_in_flight,
            shards=shards,
            http_port=http_port,
            http_host=http_host,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            metrics_subjects=metrics_subjects,
        )
        # A context only when named (--context, NATS_CONTEXT): a service must not follow
        # whichever context a person last selected with `nats context select`.
        connection = resolve_connection(flags, os.environ, settings.connection, implicit=False)
        settings = settings.override(connection=connection).validate()
        if settings.log_level not in ("debug", "info", "warn", "warning", "error"):
            raise ConfigError(
                "--log-level", f"{settings.log_level!r} is not one of debug, info, warn, error"
            )
    except NatsCronError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    log_format = settings.log_format
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    configure(settings.log_level, log_format=log_format, instance_id=settings.instance_id)

    nats_server: EmbeddedNatsServer | None = None
    if embedded:
        directory = data_dir or default_data_dir()
        try:
            nats_server = EmbeddedNatsServer(directory, port=embedded_port).start()
        except DataDirInUse as exc:  # before the server (and its store) was started
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_FATAL) from None
        except (RuntimeError, OSError) as exc:
            typer.echo(f"error: could not start the embedded nats-server: {exc}", err=True)
            raise typer.Exit(EXIT_FATAL) from None
        url = nats_server.url
        settings = settings.override(connection=settings.connection.override(url=url))
        typer.echo(
            f"embedded nats-server with JetStream on {url} (data in {directory})\n"
            f"connect with: NATS_URL={url} nats-cron status",
            err=True,
        )
    try:
        code = asyncio.run(_run(settings))
        # The loop's handlers are gone: a second SIGTERM now must not turn a clean exit
        # into a kill (an orchestrator would see a failure).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    finally:
        if nats_server is not None:
            nats_server.stop()
    raise typer.Exit(code)


async def _run(settings: Settings) -> int:
    cron = NatsCron(settings, version=__version__)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = loop.create_task(stop.wait())
    starting = loop.create_task(cron.start())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # SIGTERM while connecting: give up cleanly
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await cron.stop()
        return 0
    if starting.exception() is not None:  # report why; the orchestrator restarts us
        exc = starting.exception()
        if isinstance(exc, ConfigError):  # e.g. another number of shards: not transient
            logger.error("could not start: {}", exc)
            await cron.stop()
            return EXIT_CONFIG
        logger.opt(exception=exc).error("could not start: {}: {}", type(exc).__name__, exc)
        await cron.stop()
        return EXIT_FATAL
    fatal = loop.create_task(cron.wait_fatal())
    done, pending = await asyncio.wait({stopping, fatal}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await cron.stop()
    if fatal in done:
        logger.error("exiting: {}", cron.fatal_reason)
        return EXIT_FATAL
    return 0
