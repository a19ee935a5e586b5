"""Job commands: list, get, create, update, add, delete, pause, resume, trigger, history,
status and instances. Each talks to the nats-cron API over NATS."""

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from nats_apscheduler import CronClient, subject_matches

from .output import console, jobs_table, key_values, print_json, relative
from .runner import EXIT_UNAVAILABLE, EXIT_USAGE, Net, call, fail, networked

JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON (stable, for scripts).")]
Subject = Annotated[str, typer.Argument(help="The job's subject (its id).", show_default=False)]


def _is_pattern(subject: str) -> bool:
    return any(token in ("*", ">") for token in subject.split("."))


def _read_document(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise fail(f"{path}: not valid JSON ({exc})", EXIT_USAGE) from None


def build_document(
    subject: str,
    schedule: str,
    payload: str | None = None,
    payload_type: str | None = None,
    tz: str | None = None,
    jitter: str | None = None,
    grace: str | None = None,
    paused: bool = False,
) -> dict[str, Any]:
    """A job document from the short form: a schedule with spaces or a leading `@` is
    cron, anything else a duration; a payload that parses as JSON is sent as JSON."""
    sched: dict[str, Any] = {}
    if " " in schedule.strip() or schedule.strip().startswith("@"):
        sched["cron"] = schedule
    else:
        sched["every"] = schedule
    if tz:
        sched["timezone"] = tz
    if jitter:
        sched["jitter"] = jitter
    if grace:
        sched["grace"] = grace
    doc: dict[str, Any] = {"target": {"subject": subject}, "schedule": sched}
    if payload is not None:
        kind = payload_type
        if kind is None:
            try:
                json.loads(payload)
                kind = "json"
            except ValueError:
                kind = "text"
        doc["payload"] = {"type": kind, "data": payload}
    if paused:
        doc["paused"] = True
    return doc


Tz = Annotated[str | None, typer.Option("--tz", help="IANA time zone of a cron schedule.")]
PayloadType = Annotated[
    str | None, typer.Option(help="json, text or base64 (default: json if it parses, else text).")
]
Jitter = Annotated[str | None, typer.Option(help="Random delay up to this duration, e.g. 30s.")]
Grace = Annotated[str | None, typer.Option(help="How late a missed run may still fire, e.g. 10m.")]
Paused = Annotated[bool, typer.Option("--paused", help="Create the job paused.")]


@networked
def list_jobs(json_out: JsonOut = False, *, net: Net) -> None:
    """List every job with its schedule and run state.

    Example: nats-cron list
    """
    jobs = call(net, lambda api: api.list())
    if json_out:
        print_json({"jobs": jobs})
    elif not jobs:
        typer.echo("no jobs")
    else:
        console.print(jobs_table(jobs))


@networked
def get(subject: Subject, json_out: JsonOut = False, *, net: Net) -> None:
    """Show one job.

    Example: nats-cron get database.cleanup
    """
    job = call(net, lambda api: api.get(subject))
    if json_out:
        print_json(job)
        return
    console.print(jobs_table([job]))
    if job.get("payload"):
        typer.echo(f"payload: {json.dumps(job['payload'])}")


@networked
def create(
    file: Annotated[str, typer.Argument(help="Job document (JSON); - reads stdin.")],
    *,
    net: Net,
) -> None:
    """Create a job from a JSON document (fails if the subject exists).

    Example: nats-cron create cleanup-job.json
    """
    doc = _read_document(file)
    call(net, lambda api: api.create(doc))
    typer.echo(f"created {_subject_of(doc)}")


@networked
def update(
    subject: Annotated[
        str | None, typer.Argument(help="The job's subject.", show_default=False)
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Argument(help="Duration (30s) or cron ('0 9 * * MON').", show_default=False),
    ] = None,
    payload: Annotated[str | None, typer.Argument(help="Message body.", show_default=False)] = None,
    file: Annotated[
        str | None, typer.Option("--file", "-f", help="Job document (JSON); - reads stdin.")
    ] = None,
    tz: Tz = None,
    payload_type: PayloadType = None,
    jitter: Jitter = None,
    grace: Grace = None,
    paused: Paused = False,
    *,
    net: Net,
) -> None:
    """Create or replace a job (an upsert), from arguments or a document.

    Examples: nats-cron update reports.daily "0 9 * * *" | nats-cron update --file job.json
    """
    if file is not None:
        if subject or schedule or payload:
            raise fail("give either --file or SUBJECT SCHEDULE [PAYLOAD], not both", EXIT_USAGE)
        doc = _read_document(file)
    elif subject and schedule:
        doc = build_document(subject, schedule, payload, payload_type, tz, jitter, grace, paused)
    else:
        raise fail("give SUBJECT SCHEDULE [PAYLOAD] or --file FILE", EXIT_USAGE)
    call(net, lambda api: api.update(doc))
    typer.echo(f"updated {_subject_of(doc)}")


@networked
def add(
    subject: Subject,
    schedule: Annotated[
        str,
        typer.Argument(
            help="Duration (30s, 1h30m) or cron ('0 9 * * MON', @daily).", show_default=False
        ),
    ],
    payload: Annotated[
        str | None, typer.Argument(help="Message body (JSON or text).", show_default=False)
    ] = None,
    tz: Tz = None,
    payload_type: PayloadType = None,
    jitter: Jitter = None,
    grace: Grace = None,
    paused: Paused = False,
    *,
    net: Net,
) -> None:
    """Add a job from the command line (fails if the subject exists).

    \b
    Examples:
      nats-cron add system.heartbeat 30s
      nats-cron add database.cleanup 1h '{"table":"sessions","older_than":"7d"}'
      nats-cron add reports.daily "0 9 * * MON" --tz Europe/Berlin
    """
    doc = build_document(subject, schedule, payload, payload_type, tz, jitter, grace, paused)
    call(net, lambda api: api.create(doc))
    typer.echo(f"added {subject}")


@networked
def delete(
    target: Annotated[
        str,
        typer.Argument(
            help="A subject, or a NATS wildcard pattern (orders.>).", show_default=False
        ),
    ],
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask before deleting by pattern.")
    ] = False,
    json_out: JsonOut = False,
    *,
    net: Net,
) -> None:
    """Delete a job, or every job matching a wildcard pattern (asks first).

    Examples: nats-cron delete database.cleanup | nats-cron delete 'reports.>' --yes
    """
    if not _is_pattern(target):
        call(net, lambda api: api.delete(target))
        if json_out:
            print_json({"status": "deleted", "subject": target})
        else:
            typer.echo(f"deleted {target}")
        return
    if not yes:
        jobs = call(net, lambda api: api.list())
        matches = [
            j["target"]["subject"] for j in jobs if subject_matches(target, j["target"]["subject"])
        ]
        if not matches:
            typer.echo(f"no job matches {target}")
            return
        typer.echo(f"{len(matches)} job(s) match {target}:")
        for subject in matches:
            typer.echo(f"  {subject}")
        try:
            confirmed = typer.confirm("Delete them?", default=False)
        except typer.Abort:  # no answer (no terminal, end of input)
            raise fail("nothing deleted: no confirmation (use --yes)", EXIT_USAGE) from None
        if not confirmed:
            typer.echo("nothing deleted")
            return

        async def delete_shown(api: CronClient) -> dict[str, Any]:
            # Exactly what was shown: a job added since the question is left alone.
            for subject in matches:
                await api.delete(subject)
            return {"count": len(matches), "deleted": matches}

        reply = call(net, delete_shown)
    else:
        reply = call(net, lambda api: api.delete_pattern(target))
    if json_out:
        print_json(reply)
    else:
        typer.echo(f"deleted {reply['count']} job(s)")


def _simple(verb: str, past: str, doc: str) -> Any:
    @networked
    def command(subject: Subject, *, net: Net) -> None:
        call(net, lambda api: getattr(api, verb)(subject))
        typer.echo(f"{past} {subject}")

    command.__doc__ = doc
    command.__name__ = verb
    return command


pause = _simple(
    "pause",
    "paused",
    "Pause a job (resume computes its next run from then).\n\n"
    "Example: nats-cron pause reports.daily",
)
resume = _simple(
    "resume", "resumed", "Resume a paused job.\n\nExample: nats-cron resume reports.daily"
)


@networked
def trigger(subject: Subject, json_out: JsonOut = False, *, net: Net) -> None:
    """Fire a job once now (the leader publishes it), then carry on with its schedule.

    Example: nats-cron trigger reports.daily
    """
    reply = call(net, lambda api: api.trigger(subject))
    if json_out:
        print_json(reply)
    else:
        typer.echo(f"triggered {subject} (scheduled {reply.get('scheduled')})")


@networked
def history(
    subject: Subject,
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many runs, newest first.")] = 20,
    json_out: JsonOut = False,
    *,
    net: Net,
) -> None:
    """Show a job's recent runs (kept in a JetStream stream, across failovers).

    Example: nats-cron history reports.daily -n 5
    """
    reply = call(net, lambda api: api.history(subject, limit))
    if json_out:
        print_json(reply)
        return
    runs = reply.get("runs") or []
    if not runs:
        typer.echo(f"no runs of {subject} yet")
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("SCHEDULED", "ACTUAL", "LATE", "INSTANCE", "EPOCH", "OUTCOME"):
        table.add_column(column)
    for run in runs:
        scheduled = datetime.fromisoformat(run["scheduled"])
        actual = datetime.fromisoformat(run["actual"])
        late_ms = (actual - scheduled).total_seconds() * 1000
        table.add_row(
            run["scheduled"],
            run["actual"],
            f"{late_ms:.0f} ms",
            str(run.get("instance")),
            str(run.get("epoch")),
            run.get("outcome", "?") + (f": {run['error']}" if run.get("error") else ""),
        )
    console.print(table)


@networked
def status(json_out: JsonOut = False, *, net: Net) -> None:
    """Show which instance leads, since when, and how many jobs there are.

    Example: nats-cron status
    """
    reply = call(net, lambda api: api.status())
    if json_out:
        print_json(reply)
        return
    leader = reply.get("leader") or {}
    since = leader.get("since")
    since_dt = datetime.fromisoformat(since) if since else None
    console.print(
        key_values(
            [
                ("leader", leader.get("instance_id") or "none (election in progress)"),
                ("epoch", leader.get("epoch")),
                (
                    "leading since",
                    f"{since} ({relative(since_dt).removesuffix(' ago')})" if since else None,
                ),
                ("jobs", reply.get("jobs")),
                (
                    "answered by",
                    f"{reply.get('instance_id')} (version {reply.get('version')}, "
                    f"up {int(reply.get('uptime_seconds', 0))}s)",
                ),
            ]
        )
    )


@networked
def instances(json_out: JsonOut = False, *, net: Net) -> None:
    """List every running instance (micro discovery): role, version, endpoint stats.

    Example: nats-cron instances
    """

    async def gather(api: CronClient) -> list[dict[str, Any]]:
        pings = await api.discover("PING")
        stats = {s.get("id"): s for s in await api.discover("STATS")}
        status_reply = await api.status() if pings else {}
        leader = (status_reply.get("leader") or {}).get("instance_id")
        out = []
        for ping in pings:
            instance_id = (ping.get("metadata") or {}).get("instance_id", "?")
            endpoints = (stats.get(ping.get("id")) or {}).get("endpoints") or []
            out.append(
                {
                    "instance_id": instance_id,
                    "role": "leader" if instance_id == leader else "follower",
                    "version": ping.get("version"),
                    "id": ping.get("id"),
                    "endpoints": [
                        {
                            "name": e.get("name"),
                            "subject": e.get("subject"),
                            "num_requests": e.get("num_requests", 0),
                            "num_errors": e.get("num_errors", 0),
                            "average_processing_time_ns": e.get("average_processing_time", 0),
                        }
                        for e in endpoints
                    ],
                }
            )
        return sorted(out, key=lambda i: (i["role"] != "leader", i["instance_id"]))

    found = call(net, gather)
    if not found:
        raise fail("no nats-cron instance answered discovery", EXIT_UNAVAILABLE)
    if json_out:
        print_json({"instances": found})
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("INSTANCE", "ROLE", "VERSION", "REQUESTS", "ERRORS", "BUSIEST ENDPOINT", "ID"):
        table.add_column(column)
    for item in found:
        endpoints = item["endpoints"]
        busiest = max(endpoints, key=lambda e: e["num_requests"], default=None)
        table.add_row(
            item["instance_id"],
            item["role"],
            str(item["version"]),
            str(sum(e["num_requests"] for e in endpoints)),
            str(sum(e["num_errors"] for e in endpoints)),
            f"{busiest['name']} ({busiest['num_requests']})"
            if busiest and busiest["num_requests"]
            else "-",
            str(item["id"]),
        )
    console.print(table)


def _subject_of(doc: Any) -> str:
    if isinstance(doc, dict):
        target = doc.get("target")
        if isinstance(target, dict) and isinstance(target.get("subject"), str):
            return str(target["subject"])
        if isinstance(doc.get("subject"), str):
            return str(doc["subject"])
    return "job"
