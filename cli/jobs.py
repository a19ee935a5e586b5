"""Job commands: list, get, create, update, add, delete, pause, resume and trigger. Each
talks to the nats-cron API over NATS; every one that changes jobs takes `--dry-run`
(the service validates, nothing is stored) and `--json`."""

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from nats_apscheduler import ApiError, CronClient

from .output import (
    console,
    delivery_text,
    jobs_table,
    notice,
    outcome_text,
    print_json,
    print_json_line,
    schedule_text,
)
from .runner import (
    EXIT_CONFLICT,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    Net,
    call,
    fail,
    networked,
)
from .short import build_document, merge

JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON (stable, for scripts).")]
DryRun = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Let the service validate the change and say what it would do; store nothing.",
    ),
]
Subject = Annotated[str, typer.Argument(help="The job's subject (its id).", show_default=False)]
_PARTIAL_ATTEMPTS = 5


def is_pattern(subject: str) -> bool:
    return any(token in ("*", ">") for token in subject.split("."))


def read_document(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise fail(f"{path}: not valid JSON ({exc})", EXIT_USAGE) from None


def done(verb: str, subject: str, reply: dict[str, Any], json_out: bool) -> None:
    """Report a change that succeeded: `verb subject` (stdout), or the reply as JSON."""
    if json_out:
        print_json({"subject": subject, **reply})
    else:
        typer.echo(f"{verb} {subject}" + (" (dry run)" if reply.get("dry_run") else ""))


def ask(question: str) -> bool | None:
    """A yes/no question on stderr (stdout stays the data); None without an answer."""
    sys.stderr.write(f"{question} [y/N]: ")
    sys.stderr.flush()
    try:
        line = sys.stdin.readline()
    except (OSError, ValueError):  # no stdin at all
        line = ""
    if not line:
        sys.stderr.write("\n")  # end the question's line
        return None
    return line.strip().lower() in ("y", "yes")


def follow_until_interrupted() -> None:
    """A live command ends on Ctrl-C or SIGTERM, quietly (exit 0), both the same way: a
    KeyboardInterrupt raised in the loop, after which `asyncio.run` cancels every task and
    the command's cleanup runs. Not asyncio's own Ctrl-C handling (it would cancel only the
    main task and let it clean up while the connection's tasks still run), which it
    installs only while SIGINT has Python's default handler: this is another function.
    (Twice, on a machine loaded by a chaos run, Ctrl-C left `list --watch` and
    `history --follow` running for over 10 s, while SIGTERM, this path, always ended them;
    the hang was not reproduced since.)"""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


Tz = Annotated[str | None, typer.Option("--tz", help="IANA time zone of a cron schedule.")]
PayloadType = Annotated[
    str | None, typer.Option(help="json, text or base64 (default: json if it parses, else text).")
]
Jitter = Annotated[str | None, typer.Option(help="Random delay up to this duration, e.g. 30s.")]
Grace = Annotated[str | None, typer.Option(help="How late a missed run may still fire, e.g. 10m.")]
ScheduleArg = Annotated[
    str,
    typer.Argument(
        help="Duration (30s, 1h30m, @every 5m) or cron ('0 9 * * MON', @daily).",
        show_default=False,
    ),
]


@networked
def list_jobs(
    pattern: Annotated[
        str | None,
        typer.Argument(help="Only subjects matching this NATS wildcard pattern (orders.>)."),
    ] = None,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", "-w", help="Then print every change as it is made, until interrupted."
        ),
    ] = False,
    json_out: JsonOut = False,
    *,
    net: Net,
) -> None:
    """List the jobs (all, or those matching PATTERN) with schedule and run state.

    \b
    Examples:
      nats-cron list
      nats-cron list 'reports.>'
      nats-cron list --watch
    """
    if watch:
        _watch(net, pattern, json_out)
        return
    jobs = call(net, lambda api: api.list(pattern))
    if json_out:
        print_json({"jobs": jobs})
    elif not jobs:
        notice("no jobs" if pattern is None else f"no job matches {pattern}")
    else:
        console.print(jobs_table(jobs))


def _watch(net: Net, pattern: str | None, json_out: bool) -> None:
    async def watch(api: CronClient) -> None:
        feed = await api.changes(pattern or ">")  # before listing: no change falls between
        try:
            jobs = await api.list(pattern)
            if json_out:
                for job in jobs:
                    print_json_line({"change": "existing", "subject": job["target"]["subject"],
                                     "revision": job.get("revision"), "job": job})  # fmt: skip
            elif jobs:
                console.print(jobs_table(jobs))
            else:
                notice("no jobs yet" if pattern is None else f"no job matches {pattern} yet")
            sys.stdout.flush()
            notice("watching for changes (Ctrl-C ends)")
            async for event in feed:
                if json_out:
                    print_json_line(event)
                else:
                    typer.echo(_change_line(event))
                    sys.stdout.flush()
        finally:
            await feed.close()

    follow_until_interrupted()
    try:
        call(net, watch)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def _change_line(event: dict[str, Any]) -> str:
    """`2026-12-03T09:40:17.006Z  updated  reports.daily  0 8 * * 1-5 (Europe/Berlin)  by ...`"""
    job = event.get("job") or {}
    parts = [
        str(event.get("time", "?")),
        f"{event.get('change', '?'):<9}",
        event.get("subject", "?"),
    ]
    if job:
        parts.append(schedule_text(job) + (" paused" if job.get("paused") else ""))
    requester = event.get("requester") or {}
    who = "/".join(requester[k] for k in ("account", "user", "name") if requester.get(k))
    parts.append((f"by {who} " if who else "") + f"via {event.get('instance', '?')}")
    return "  ".join(parts)


@networked
def get(subject: Subject, json_out: JsonOut = False, *, net: Net) -> None:
    """Show one job (with its `revision`, for `update --revision`).

    Example: nats-cron get database.cleanup
    """
    job = call(net, lambda api: api.get(subject))
    if json_out:
        print_json(job)
        return
    console.print(jobs_table([job]))
    if job.get("payload"):
        typer.echo(f"payload: {json.dumps(job['payload'])}")
    typer.echo(f"delivery: {delivery_text(job)}")
    if job.get("last_outcome"):
        typer.echo(f"last outcome: {outcome_text(job.get('last_outcome'), job.get('last_error'))}")
        typer.echo(f"last success: {job.get('last_success') or 'never'}")
        typer.echo(f"consecutive failures: {job.get('consecutive_failures') or 0}")
    if job.get("revision") is not None:
        typer.echo(f"revision: {job['revision']}")


@networked
def create(
    file: Annotated[str, typer.Argument(help="Job document (JSON); - reads stdin.")],
    dry_run: DryRun = False,
    json_out: JsonOut = False,
    *,
    net: Net,
) -> None:
    """Create a job from a JSON document (fails if the subject exists).

    Example: nats-cron create cleanup-job.json
    """
    doc = read_document(file)
    reply = call(net, lambda api: api.create(doc, dry_run=dry_run))
    done("created", str(reply.get("subject") or _subject_of(doc)), reply, json_out)


@networked
def update(
    subject: Annotated[
        str | None, typer.Argument(help="The job's subject.", show_default=False)
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Argument(
            help="Duration (30s, @every 5m) or cron ('0 9 * * MON').", show_default=False
        ),
    ] = None,
    payload: Annotated[
        str | None,
        typer.Argument(help="New message body ('' for none: a ULID).", show_default=False),
    ] = None,
    file: Annotated[
        str | None,
        typer.Option("--file", "-f", help="Replace with this whole document (JSON); - is stdin."),
    ] = None,
    tz: Tz = None,
    payload_type: PayloadType = None,
    jitter: Jitter = None,
    grace: Grace = None,
    paused: Annotated[
        bool | None, typer.Option("--paused/--resumed", help="Pause or resume it as well.")
    ] = None,
    revision: Annotated[
        int | None,
        typer.Option(
            help="Change it only if it is still at this revision (see get); 0: only if new.",
            min=0,
        ),
    ] = None,
    dry_run: DryRun = False,
    json_out: JsonOut = False,
    *,
    net: Net,
) -> None:
    """Change a job's schedule, and whatever else is given; keep everything else.

    SUBJECT SCHEDULE [PAYLOAD] changes the schedule (and the payload, zone, jitter, grace
    or paused state when given) of the job as it is now; a change made meanwhile by
    someone else is never overwritten (the update is redone on top of it). A job that does
    not exist is created. --file replaces the whole job with a document instead (a
    `revision` in it must still be the job's).

    \b
    Examples:
      nats-cron update reports.daily "0 8 * * MON-FRI"
      nats-cron update reports.daily 1h --revision 7
      nats-cron update --file job.json
    """
    if file is not None:
        if subject or schedule or payload is not None:
            raise fail("give either --file or SUBJECT SCHEDULE [PAYLOAD], not both", EXIT_USAGE)
        doc = read_document(file)
        reply = call(net, lambda api: api.update(doc, revision=revision, dry_run=dry_run))
        done("updated", str(reply.get("subject") or _subject_of(doc)), reply, json_out)
        return
    if not (subject and schedule):
        raise fail("give SUBJECT SCHEDULE [PAYLOAD] or --file FILE", EXIT_USAGE)
    given = (subject, schedule)

    async def partial(api: CronClient) -> dict[str, Any]:
        for _ in range(_PARTIAL_ATTEMPTS):
            try:
                current: dict[str, Any] | None = await api.get(given[0])
            except ApiError as exc:
                if exc.code != 404:
                    raise
                current = None
            if current is None:
                if payload is None and payload_type is not None:
                    raise fail("--payload-type needs a PAYLOAD for a new job", EXIT_USAGE)
                doc = build_document(*given, payload, payload_type, tz, jitter, grace, bool(paused))
                expected = 0
            else:
                if payload is None and payload_type is not None and not current.get("payload"):
                    raise fail(f"{given[0]} has no payload to give a type: add PAYLOAD", EXIT_USAGE)
                doc = merge(current, given[1], payload, payload_type, tz, jitter, grace, paused)
                expected = int(current.get("revision") or 0)
            if revision is not None and expected != revision:
                what = f"revision {expected}" if current is not None else "no such job"
                raise fail(
                    f"{given[0]} changed: {what}, expected revision {revision}; nothing updated",
                    EXIT_CONFLICT if current is not None else EXIT_NOT_FOUND,
                )
            try:
                return await api.update(doc, revision=expected, dry_run=dry_run)
            except ApiError as exc:
                # Changed or deleted since we read it: lay the change over the new version.
                if exc.code in (404, 409) and revision is None:
                    continue
                raise
        raise fail(f"{given[0]} kept changing concurrently; nothing updated", EXIT_CONFLICT)

    reply = call(net, partial)
    done("created" if reply.get("created") else "updated", subject, reply, json_out)


@networked
def add(
    subject: Subject,
    schedule: ScheduleArg,
    payload: Annotated[
        str | None, typer.Argument(help="Message body (JSON or text).", show_default=False)
    ] = None,
    tz: Tz = None,
    payload_type: PayloadType = None,
    jitter: Jitter = None,
    grace: Grace = None,
    paused: Annotated[bool, typer.Option("--paused", help="Create the job paused.")] = False,
    dry_run: DryRun = False,
    json_out: JsonOut = False,
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
    reply = call(net, lambda api: api.create(doc, dry_run=dry_run))
    done("added", subject, reply, json_out)


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
    ignore_not_found: Annotated[
        bool,
        typer.Option("--ignore-not-found", help="A job that does not exist is not an error."),
    ] = False,
    dry_run: DryRun = False,
    json_out: JsonOut = False,
    *,
    net: Net,
) -> None:
    """Delete a job (and its history), or every job matching a wildcard pattern (asks
    first). Deleting a job that does not exist fails with exit 3.

    Examples: nats-cron delete database.cleanup | nats-cron delete 'reports.>' --yes
    """
    if not is_pattern(target):
        reply = call(net, lambda api: api.delete(target, dry_run=dry_run))
        if reply.get("existed", True):
            done("deleted", target, reply, json_out)
            return
        if not ignore_not_found:
            raise fail(f"no job with subject {target!r}: nothing deleted", EXIT_NOT_FOUND)
        notice(f"no job with subject {target!r}: nothing deleted")
        if json_out:
            print_json({"subject": target, **reply})
        return
    if dry_run or yes:
        reply = call(net, lambda api: api.delete_pattern(target, dry_run=dry_run))
        _deleted(target, reply, json_out)
        return
    jobs = call(net, lambda api: api.list(target))
    matches = [j["target"]["subject"] for j in jobs]
    if not matches:
        _deleted(target, {"count": 0, "deleted": []}, json_out)
        return
    notice(f"{len(matches)} job(s) match {target}:")
    for subject in matches:
        notice(f"  {subject}")
    confirmed = ask("Delete them?")
    if confirmed is None:  # no answer (no terminal, end of input)
        raise fail("nothing deleted: no confirmation (use --yes)", EXIT_USAGE)
    if not confirmed:
        notice("nothing deleted")
        return

    async def delete_shown(api: CronClient) -> dict[str, Any]:
        # Exactly what was shown: a job added since the question is left alone.
        gone = [s for s in matches if (await api.delete(s)).get("existed", True)]
        return {"count": len(gone), "deleted": gone}

    _deleted(target, call(net, delete_shown), json_out)


def _deleted(pattern: str, reply: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print_json(reply)
    elif not reply.get("count"):
        notice(f"no job matches {pattern}")
    else:
        typer.echo(
            f"deleted {reply['count']} job(s)" + (" (dry run)" if reply.get("dry_run") else "")
        )


@networked
def pause(
    subject: Subject, dry_run: DryRun = False, json_out: JsonOut = False, *, net: Net
) -> None:
    """Pause a job (resume computes its next run from then).

    Example: nats-cron pause reports.daily
    """
    reply = call(net, lambda api: api.pause(subject, dry_run=dry_run))
    done("paused", subject, reply, json_out)


@networked
def resume(
    subject: Subject, dry_run: DryRun = False, json_out: JsonOut = False, *, net: Net
) -> None:
    """Resume a paused job.

    Example: nats-cron resume reports.daily
    """
    reply = call(net, lambda api: api.resume(subject, dry_run=dry_run))
    done("resumed", subject, reply, json_out)


@networked
def trigger(
    subject: Subject,
    force: Annotated[
        bool, typer.Option("--force", help="Run a paused job once too (it stays paused).")
    ] = False,
    dry_run: DryRun = False,
    json_out: JsonOut = False,
    *,
    net: Net,
) -> None:
    """Fire a job once now (the leader publishes it), then carry on with its schedule.

    A paused job is refused unless --force: then it runs once and stays paused.

    Example: nats-cron trigger reports.daily
    """
    reply = call(net, lambda api: api.trigger(subject, force=force, dry_run=dry_run))
    if json_out:
        print_json({"subject": subject, **reply})
    else:
        suffix = " (dry run)" if reply.get("dry_run") else ""
        typer.echo(f"triggered {subject} (scheduled {reply.get('scheduled')}){suffix}")


def _subject_of(doc: Any) -> str:
    if isinstance(doc, dict):
        target = doc.get("target")
        if isinstance(target, dict) and isinstance(target.get("subject"), str):
            return str(target["subject"])
        if isinstance(doc.get("subject"), str):
            return str(doc["subject"])
    return "job"
