"""The Typer application behind the `nats-cron` command."""

from typing import Any

import typer

from nats_apscheduler import __version__

from . import files, info, jobs, offline
from .options import ConnectionFlags, root_signature
from .serve import serve

app = typer.Typer(
    name="nats-cron",
    help=(
        "A distributed, highly available cron scheduler for NATS.\n\n"
        "Jobs live in JetStream KV; one elected instance fires them. The connection "
        "options below work before or after the command (nats-cron -s URL list, "
        "nats-cron list -s URL); the NATS_* variables of the nats CLI and its contexts "
        "(--context, NATS_CONTEXT) work too.\n\n"
        "Exit codes: 0 ok, 1 unexpected error, 2 usage or validation, 3 not found, "
        "4 connection/timeout/no instance, 5 permission denied, 6 conflict."
    ),
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
)

CONNECTION_EPILOG = (
    "Connection options (--server/-s, --context, --creds, --user, --password, --token, "
    "--nkey, --tlsca, --tlscert, --tlskey, --timeout) go before or after the command: "
    "see nats-cron --help."
)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
@root_signature
def root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    *,
    flags: ConnectionFlags,
) -> None:
    """Schedule NATS messages: jobs live in JetStream KV, one elected leader fires them."""
    ctx.obj = flags


def command(name: str | None = None, hidden: bool = False) -> Any:
    """Register a command that connects to NATS (its help points at the root's options)."""
    return app.command(name, hidden=hidden, epilog=CONNECTION_EPILOG)


command()(serve)
command("list")(jobs.list_jobs)
command("ls", hidden=True)(jobs.list_jobs)
command()(jobs.get)
command()(jobs.create)
command()(jobs.update)
command()(jobs.add)
command()(jobs.delete)
command("del", hidden=True)(jobs.delete)
command()(info.status)
command()(jobs.pause)
command()(jobs.resume)
command()(jobs.trigger)
command()(info.history)
command()(info.instances)
command("export")(files.export)
command()(files.apply)
app.command()(offline.validate)
app.command("next")(offline.next_times)


def main() -> None:
    app(prog_name="nats-cron")
