"""Human output (rich tables) and stable JSON output for scripts; notices on stderr."""

import json
import sys
from datetime import UTC, datetime
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

# Piped output keeps one row per line (rich would wrap at 80 columns).
console = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 240)


def print_json(data: Any) -> None:
    """Stable for scripts: indented, keys in a fixed order, always valid JSON on stdout."""
    print(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))


def print_json_line(data: Any) -> None:
    """One compact JSON object per line (a live feed: --watch, --follow)."""
    print(json.dumps(data, sort_keys=True, ensure_ascii=False), flush=True)


def notice(message: str) -> None:
    """Something for the person, not the result (stdout stays the data): stderr."""
    typer.echo(message, err=True)


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def relative(when: datetime | None, now: datetime | None = None) -> str:
    """`in 4m 10s` / `2h 3m ago`."""
    if when is None:
        return "-"
    now = now or datetime.now(UTC)
    seconds = round((when - now).total_seconds())
    future = seconds >= 0
    seconds = abs(seconds)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(parts) == 2:
            break
    text = " ".join(parts)
    return f"in {text}" if future else f"{text} ago"


def when(text: str | None, short: bool = False) -> str:
    """`in 4m 10s (2026-12-03 09:40:17Z)`; `short`: `in 4m 10s`."""
    moment = parse_time(text)
    if moment is None:
        return "-"
    if short:
        return relative(moment)
    return f"{relative(moment)} ({moment.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S')}Z)"


def schedule_text(job: dict[str, Any]) -> str:
    schedule = job.get("schedule") or {}
    if "every" in schedule:
        text = f"every {schedule['every']}"
    elif "cron" in schedule:
        zone = schedule.get("timezone", "UTC")
        text = schedule["cron"] + ("" if zone == "UTC" else f" ({zone})")
    elif "at" in schedule:
        text = f"at {schedule['at']}"
    else:
        text = "?"
    if schedule.get("jitter"):
        text += f" ±{schedule['jitter']}"
    return text


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    """The subject never wraps (a subject broken in two reads as two subjects); on a
    narrow terminal the other columns fold, and the last error is cut with an ellipsis."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    widest = max((len(job.get("target", {}).get("subject", "?")) for job in jobs), default=7)
    narrow = console.width < 160
    table.add_column("SUBJECT", no_wrap=True, min_width=max(widest, 7))
    for column in ("SCHEDULE", "NEXT RUN", "LAST RUN"):
        table.add_column(column, overflow="fold")
    table.add_column("RUNS", no_wrap=True, justify="right")
    table.add_column("PAUSED", no_wrap=True)
    table.add_column(
        "LAST OUTCOME", overflow="ellipsis", no_wrap=True, max_width=max(12, console.width // 5)
    )
    for job in jobs:
        table.add_row(
            job.get("target", {}).get("subject", "?"),
            schedule_text(job),
            when(job.get("next_run"), short=narrow),
            when(job.get("last_run"), short=narrow),
            str(job.get("run_count", 0)),
            "yes" if job.get("paused") else "no",
            outcome_text(job.get("last_outcome"), job.get("last_error")),
        )
    return table


def outcome_text(outcome: Any, error: Any) -> str:
    """`succeeded`, `failed: 500 boom`; `-` before the first run."""
    if not outcome:
        return "-" if not error else str(error)
    return f"{outcome}: {error}" if error else str(outcome)


def delivery_text(job: dict[str, Any]) -> str:
    """`request, timeout 5s, 3 attempts (1s x2 up to 1m), overlap skip`; `publish`."""
    delivery = job.get("delivery") or {}
    mode = delivery.get("mode", "publish")
    parts = [str(mode)]
    if delivery.get("timeout"):
        parts.append(f"timeout {delivery['timeout']}")
    retry = delivery.get("retry")
    if isinstance(retry, dict):
        parts.append(
            f"{retry.get('attempts')} attempts ({retry.get('backoff')} x{retry.get('multiplier')} "
            f"up to {retry.get('max_backoff')})"
        )
    if delivery.get("overlap") == "skip":
        parts.append("overlap skip")
    return ", ".join(parts)


def key_values(rows: list[tuple[str, Any]]) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, "-" if value is None or value == "" else str(value))
    return table
