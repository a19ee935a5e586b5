"""Jobs as code: `export` writes every job as one document, `apply -f FILE` makes the
service's jobs what the file says (idempotent; `--prune` deletes the jobs it does not
name). The file is `{"jobs": [job document, ...]}`; `list --json` output is accepted too
(run state and revisions are ignored)."""

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nats_apscheduler import CronClient, SpecError, parse_job

from .jobs import DryRun, JsonOut, read_document
from .output import notice, print_json
from .runner import EXIT_CONFLICT, EXIT_UNAVAILABLE, EXIT_USAGE, Net, call, fail, networked
from .short import definition

PROGRESS_MIN = 1000  # items from which a terminal gets a progress bar
# What `get`/`list` add to a job document: never part of a file.
_READ_ONLY = {
    "next_run",
    "last_run",
    "last_scheduled",
    "run_count",
    "last_error",
    "last_outcome",
    "last_success",
    "consecutive_failures",
    "revision",
}


@networked
def export(
    pattern: Annotated[
        str | None,
        typer.Argument(help="Only the jobs matching this NATS wildcard pattern."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file, not stdout.")
    ] = None,
    *,
    net: Net,
) -> None:
    """Write every job (or those matching PATTERN) as one JSON document for `apply`.

    Stable: jobs in subject order, keys sorted, no run state; a backup, or jobs as code.

    \b
    Examples:
      nats-cron export > jobs.json
      nats-cron export 'reports.>' -o reports.json
    """
    jobs = call(net, lambda api: api.list(pattern))
    document = {"jobs": [definition(job) for job in jobs]}
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        raise fail(f"cannot write {output}: {exc.strerror or exc}", EXIT_USAGE) from None
    notice(f"exported {len(jobs)} job(s) to {output}")


def jobs_in(data: Any, where: str) -> list[dict[str, Any]]:
    """The job documents of a file: `{"jobs": [...]}` (export, list --json) or `[...]`;
    each checked offline (every rule but the service's own limits), all errors at once."""
    if isinstance(data, dict) and isinstance(data.get("jobs"), list):
        items = data["jobs"]
    elif isinstance(data, list):
        items = data
    else:
        raise fail(f'{where}: expected {{"jobs": [job, ...]}} or a JSON array of jobs', EXIT_USAGE)
    documents: list[dict[str, Any]] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            errors.append(f"jobs[{i}]: a job document must be a JSON object")
            continue
        doc = {key: value for key, value in item.items() if key not in _READ_ONLY}
        try:
            spec = parse_job(doc, min_interval=timedelta(0), strict=True)
        except SpecError as exc:
            errors.append(f"jobs[{i}]: {exc}")
            continue
        if spec.subject in seen:
            errors.append(f"jobs[{i}]: {spec.subject} is also jobs[{seen[spec.subject]}]")
            continue
        seen[spec.subject] = i
        documents.append(doc)
    if errors:
        for line in errors:
            notice(f"error: {where}: {line}")
        raise typer.Exit(EXIT_USAGE)
    return documents


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when it is a terminal and there is much to do."""
    console = Console(stderr=True)
    if total < PROGRESS_MIN or not console.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@networked
def apply(
    file: Annotated[
        str, typer.Option("--file", "-f", help="Jobs file (JSON, as export writes); - is stdin.")
    ],
    prune: Annotated[
        bool, typer.Option("--prune", help="Delete the jobs the file does not name.")
    ] = False,
    dry_run: DryRun = False,
    json_out: JsonOut = False,
    *,
    net: Net,
) -> None:
    """Make the jobs what FILE says: create the new ones, change the ones that differ,
    leave the rest alone (applying twice changes nothing); with --prune, delete the jobs
    it does not name. Every document is validated (offline, then by the service) before
    anything is changed.

    \b
    Examples:
      nats-cron apply -f jobs.json --dry-run
      nats-cron apply -f jobs.json --prune
    """
    documents = jobs_in(read_document(file), file)
    named = {_subject(doc) for doc in documents}

    async def run(api: CronClient) -> list[dict[str, Any]]:
        deletes: list[str] = []
        if prune:
            deletes = [j["target"]["subject"] for j in await api.list()]
            deletes = [s for s in deletes if s not in named]
        total = len(documents) + len(deletes)
        with progress_bar(total, "validating") as advance:
            plan = await api.apply(documents, deletes, dry_run=True, progress=advance)
        if dry_run or any(r["action"] == "invalid" for r in plan):
            return plan
        todo = {r["subject"] for r in plan if r["action"] in ("created", "changed")}
        changing = [doc for doc in documents if _subject(doc) in todo]
        dropping = [r["subject"] for r in plan if r["action"] == "deleted"]
        with progress_bar(len(changing) + len(dropping), "applying") as advance:
            done = await api.apply(changing, dropping, progress=advance)
        outcome = {r["subject"]: r for r in done}
        return [outcome.get(r["subject"], r) for r in plan]

    results = call(net, run)
    invalid = [r for r in results if r["action"] == "invalid"]
    if invalid:
        for result in invalid:
            notice(f"error: {file}: {result.get('subject')}: {result.get('error')}")
        raise fail("nothing applied: the service refused the documents above", EXIT_USAGE)
    _report(results, dry_run, json_out)
    failed = [r for r in results if r["action"] == "failed"]
    if failed:
        for result in failed:
            notice(f"error: {result['subject']}: {result.get('error')}")
        conflicts = all("changing" in str(r.get("error")) for r in failed)
        raise typer.Exit(EXIT_CONFLICT if conflicts else EXIT_UNAVAILABLE)


def _subject(doc: dict[str, Any]) -> str:
    target = doc.get("target")
    if isinstance(target, dict):
        return str(target.get("subject"))
    return str(doc.get("subject"))


def _report(results: list[dict[str, Any]], dry_run: bool, json_out: bool) -> None:
    by_action: dict[str, list[str]] = {
        "created": [],
        "changed": [],
        "deleted": [],
        "unchanged": [],
        "absent": [],
    }
    for result in results:
        if result["action"] in by_action:
            by_action[result["action"]].append(result["subject"])
    if json_out:
        failed = [
            {"subject": r["subject"], "error": r.get("error")}
            for r in results
            if r["action"] == "failed"
        ]
        report = {key: sorted(value) for key, value in by_action.items() if key != "absent"}
        print_json({**report, "failed": failed, "dry_run": dry_run})
        return
    for action in ("created", "changed", "deleted"):
        for subject in sorted(by_action[action]):
            typer.echo(f"{action} {subject}" + (" (dry run)" if dry_run else ""))
    counts = ", ".join(
        f"{len(by_action[action])} {action}"
        for action in ("created", "changed", "deleted", "unchanged")
    )
    notice(f"apply: {counts}" + (" (dry run: nothing changed)" if dry_run else ""))
