"""The Typer application behind the `nats-cron` command."""

import typer

from nats_apscheduler import __version__

from . import jobs, offline
from .serve import serve

app = typer.Typer(
    name="nats-cron",
    help=(
        "A distributed, highly available cron scheduler for NATS.\n\n"
        "Jobs live in JetStream KV; one elected instance fires them. Connection: --server or "
        "NATS_URL, credentials flags or NATS_* variables, or --context NAME (nats CLI).\n\n"
        "Exit codes: 0 ok, 1 unexpected error, 2 usage or validation, 3 not found, "
        "4 connection/timeout/no instance, 5 permission denied, 6 conflict."
    ),
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Schedule NATS messages: jobs live in JetStream KV, one elected leader fires them."""


app.command()(serve)
app.command("list")(jobs.list_jobs)
app.command("ls", hidden=True)(jobs.list_jobs)
app.command()(jobs.get)
app.command()(jobs.create)
app.command()(jobs.update)
app.command()(jobs.add)
app.command()(jobs.delete)
app.command("del", hidden=True)(jobs.delete)
app.command()(jobs.status)
app.command()(jobs.pause)
app.command()(jobs.resume)
app.command()(jobs.trigger)
app.command()(jobs.history)
app.command()(jobs.instances)
app.command()(offline.validate)
app.command("next")(offline.next_times)


def main() -> None:
    app(prog_name="nats-cron")
