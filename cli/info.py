"""Commands that look, not change: history (`--follow` for live runs), status, instances."""

import sys
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from nats_apscheduler import CronClient

from .jobs import JsonOut, follow_until_interrupted, is_pattern
from .output import console, key_values, notice, print_json, print_json_line, relative
from .runner import EXIT_UNAVAILABLE, EXIT_USAGE, Net, call, fail, networked


def _late_ms(run: dict[str, Any]) -> str:
    try:
        scheduled = datetime.fromisoformat(run["scheduled"])
        actual = datetime.fromisoformat(run["actual"])
    except (KeyError, TypeError, ValueError):
        return "-"
    return f"{(actual - scheduled).total_seconds() * 1000:.0f} ms"


def _outcome(run: dict[str, Any]) -> str:
    """`succeeded in 12 ms`, `failed in 3 ms: 500 boom (next attempt 2026-...)`,
    `stored in 1 ms (ORDERS #42)`, `fired`."""
    text = str(run.get("outcome", "?"))
    duration = run.get("duration")
    if isinstance(duration, int | float) and not isinstance(duration, bool):
        text += f" in {duration * 1000:.0f} ms"
    if run.get("stream"):
        text += (
            f" ({run['stream']} #{run.get('seq')}{', duplicate' if run.get('duplicate') else ''})"
        )
    if run.get("error"):
        text += f": {run['error']}"
    if run.get("next_attempt"):
        text += f" (attempt {int(run.get('attempt') or 0) + 1} at {run['next_attempt']})"
    if run.get("dead_letter"):
        text += f" (dead letter: {run['dead_letter']})"
    return text


def _attempt(run: dict[str, Any]) -> str:
    attempt = run.get("attempt")
    return "-" if attempt is None else str(attempt)


_ROW = "{:<26} {:<26} {:>9}  {:>7}  {:<16} {:>6}  {}"
_COLUMNS = ("SCHEDULED", "ACTUAL", "LATE", "ATTEMPT", "INSTANCE", "EPOCH", "OUTCOME")


def _row(run: dict[str, Any], with_subject: bool) -> str:
    line = _ROW.format(
        str(run.get("scheduled")),
        str(run.get("actual")),
        _late_ms(run),
        _attempt(run),
        str(run.get("instance")),
        str(run.get("epoch")),
        _outcome(run),
    )
    return f"{run.get('subject')}  {line}" if with_subject else line


@networked
def history(
    subject: Annotated[
        str,
        typer.Argument(
            help="The job's subject (with --follow also a wildcard pattern).", show_default=False
        ),
    ],
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many runs, newest first.")] = 20,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Then print every new run as it happens (oldest first)."
        ),
    ] = False,
    json_out: JsonOut = False,
    *,
    net: Net,
) -> None:
    """Show a job's recent runs and their outcomes (events kept in a JetStream stream).

    \b
    Examples:
      nats-cron history reports.daily -n 5
      nats-cron history reports.daily --follow
      nats-cron history 'reports.>' --follow
    """
    if follow:
        _follow(net, subject, limit, json_out)
        return
    if is_pattern(subject):
        raise fail("a wildcard pattern needs --follow (history reads one job)", EXIT_USAGE)
    reply = call(net, lambda api: api.history(subject, limit))
    if json_out:
        print_json(reply)
        return
    runs = reply.get("runs") or []
    if not runs:
        notice(f"no runs of {subject} yet")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in _COLUMNS:
        table.add_column(column, no_wrap=column in ("SCHEDULED", "ACTUAL"))
    for run in runs:
        table.add_row(
            str(run.get("scheduled")),
            str(run.get("actual")),
            _late_ms(run),
            _attempt(run),
            str(run.get("instance")),
            str(run.get("epoch")),
            _outcome(run),
        )
    console.print(table)


def _follow(net: Net, subject: str, limit: int, json_out: bool) -> None:
    pattern = is_pattern(subject)

    async def follow(api: CronClient) -> None:
        status = await api.status()
        events = status.get("events_subject") or status.get("history_subject")
        feed = await api.runs(subject, events)  # subscribed before reading
        try:
            shown: set[tuple[Any, ...]] = set()
            recent = [] if pattern else (await api.history(subject, limit)).get("runs") or []
            if not json_out:
                header = _ROW.format(*_COLUMNS)
                typer.echo(f"SUBJECT  {header}" if pattern else header)
            for run in reversed(recent):
                shown.add(_key(run))
                _print_run(run, pattern, json_out)
            notice("following runs (Ctrl-C ends)")
            async for run in feed:
                if _key(run) not in shown:
                    _print_run(run, pattern, json_out)
        finally:
            await feed.close()

    follow_until_interrupted()
    try:
        call(net, follow)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _key(run: dict[str, Any]) -> tuple[Any, ...]:
    return (
        run.get("subject"),
        run.get("scheduled"),
        run.get("actual"),
        run.get("instance"),
        run.get("attempt"),
        run.get("outcome"),
    )


def _print_run(run: dict[str, Any], with_subject: bool, json_out: bool) -> None:
    if json_out:
        print_json_line(run)
    else:
        typer.echo(_row(run, with_subject))
        sys.stdout.flush()


@networked
def status(json_out: JsonOut = False, *, net: Net) -> None:
    """Show which instance leads, since when, and how many jobs there are.

    Example: nats-cron status
    """
    reply = call(net, lambda api: api.status())
    if json_out:
        print_json(reply)
        return
    if reply.get("shards"):
        _shard_status(reply)
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


def _shard_status(reply: dict[str, Any]) -> None:
    """A deployment with shards: who leads each one, with its epoch and since when."""
    shards = reply.get("shards") or []
    owned = [s for s in shards if s.get("owner")]
    console.print(
        key_values(
            [
                ("shards", f"{len(owned)} of {len(shards)} led"),
                ("instances", reply.get("instances_live")),
                ("jobs", reply.get("jobs")),
                (
                    "answered by",
                    f"{reply.get('instance_id')} (version {reply.get('version')}, "
                    f"up {int(reply.get('uptime_seconds', 0))}s)",
                ),
            ]
        )
    )
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("SHARD", "OWNER", "EPOCH", "SINCE"):
        table.add_column(column)
    for shard in shards:
        since = shard.get("since")
        since_dt = datetime.fromisoformat(since) if since else None
        table.add_row(
            str(shard.get("shard")),
            shard.get("owner") or "none (election in progress)",
            str(shard.get("epoch") or "-"),
            f"{since} ({relative(since_dt).removesuffix(' ago')})" if since else "-",
        )
    console.print(table)


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
        held: dict[str, int] = {}
        for shard in status_reply.get("shards") or []:
            if shard.get("owner"):
                held[shard["owner"]] = held.get(shard["owner"], 0) + 1
        out = []
        for ping in pings:
            instance_id = (ping.get("metadata") or {}).get("instance_id", "?")
            endpoints = (stats.get(ping.get("id")) or {}).get("endpoints") or []
            out.append(
                {
                    "instance_id": instance_id,
                    "role": "leader"
                    if instance_id == leader or held.get(instance_id)
                    else "follower",
                    "shards": held.get(instance_id, 1 if instance_id == leader else 0),
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
        return sorted(out, key=lambda i: (i["role"] != "leader", -i["shards"], i["instance_id"]))

    found = call(net, gather)
    if not found:
        raise fail("no nats-cron instance answered discovery", EXIT_UNAVAILABLE)
    if json_out:
        print_json({"instances": found})
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = ("INSTANCE", "ROLE", "SHARDS", "VERSION", "REQUESTS", "ERRORS", "BUSIEST ENDPOINT")
    for column in (*columns, "ID"):
        table.add_column(column)
    for item in found:
        endpoints = item["endpoints"]
        busiest = max(endpoints, key=lambda e: e["num_requests"], default=None)
        table.add_row(
            item["instance_id"],
            item["role"],
            str(item["shards"]),
            str(item["version"]),
            str(sum(e["num_requests"] for e in endpoints)),
            str(sum(e["num_errors"] for e in endpoints)),
            f"{busiest['name']} ({busiest['num_requests']})"
            if busiest and busiest["num_requests"]
            else "-",
            str(item["id"]),
        )
    console.print(table)
