"""Offline tools that need no server: `validate` a job document, preview `next` fire times."""

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import typer

from nats_apscheduler import JobSpec, SpecError, fire_times, parse_duration, parse_job

from .output import console, notice, print_json
from .runner import EXIT_USAGE, fail
from .short import build_document

JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON (stable, for scripts).")]
Count = Annotated[int, typer.Option("--count", "-n", help="How many fire times.", min=1, max=1000)]


def _show(spec: JobSpec, times: list[datetime], json_out: bool, extra: dict[str, Any]) -> None:
    zone = ZoneInfo(spec.timezone)
    if json_out:
        print_json({**extra, "next": [t.astimezone(UTC).isoformat() for t in times]})
        return
    if not times:
        notice("never fires again")
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("#")
    table.add_column("UTC")
    if spec.timezone != "UTC":
        table.add_column(spec.timezone)
    for i, moment in enumerate(times, 1):
        row = [str(i), moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"]
        if spec.timezone != "UTC":
            row.append(moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z"))
        table.add_row(*row)
    console.print(table)


def validate(
    file: Annotated[str, typer.Argument(help="Job document (JSON); - reads stdin.")],
    count: Count = 5,
    min_interval: Annotated[
        str, typer.Option(help="Smallest `every` accepted (as the server).")
    ] = "1s",
    json_out: JsonOut = False,
) -> None:
    """Check a job document offline: what is wrong, or its next fire times.

    Example: nats-cron validate cleanup-job.json
    """
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text()
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror or exc}", EXIT_USAGE) from None
    try:
        document = json.loads(text)
        spec = parse_job(
            document, min_interval=parse_duration(min_interval, "--min-interval"), strict=True
        )
    except ValueError as exc:  # JSON errors and SpecError
        message = str(exc) if isinstance(exc, SpecError) else f"not valid JSON ({exc})"
        if json_out:
            print_json({"valid": False, "error": message})
            raise typer.Exit(EXIT_USAGE) from None
        raise fail(f"{file}: {message}", EXIT_USAGE) from None
    now = datetime.now(UTC)
    times = fire_times(spec.trigger(now), now, count)
    if not json_out:
        typer.echo(f"{file}: valid job for {spec.subject}")
    _show(
        spec, times, json_out, {"valid": True, "subject": spec.subject, "job": spec.to_document()}
    )


def next_times(
    schedule: Annotated[
        str,
        typer.Argument(help="Duration (30s) or cron ('0 9 * * MON', @daily).", show_default=False),
    ],
    count: Count = 5,
    tz: Annotated[str | None, typer.Option("--tz", help="IANA zone of the cron schedule.")] = None,
    json_out: JsonOut = False,
) -> None:
    """Preview the next fire times of a cron or every expression, in UTC and its zone.

    Examples: nats-cron next "0 9 * * MON-FRI" --tz Europe/Berlin -n 3 | nats-cron next 90m
    """
    doc = build_document("preview", schedule, tz=tz)
    try:
        spec = parse_job(doc, min_interval=timedelta(0), strict=True)
    except SpecError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    now = datetime.now(UTC)
    times = fire_times(spec.trigger(now), now, count)
    _show(spec, times, json_out, {"schedule": doc["schedule"]})
