"""The Typer application behind the `nats-cron` command."""

from __future__ import annotations

import typer

from nats_apscheduler import __version__

from .serve import serve

app = typer.Typer(
    name="nats-cron",
    help="A distributed, highly available cron scheduler for NATS.",
    no_args_is_help=True,
    add_completion=True,
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


def main() -> None:
    app()
