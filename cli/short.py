"""The command line's short form of a job (`SUBJECT SCHEDULE [PAYLOAD]` and flags) to a
job document, and a partial change laid over a job read back (`update`)."""

import json
from typing import Any

_KINDS = ("every", "cron", "at")


def schedule_of(text: str) -> dict[str, str]:
    """`30s` / `1h30m` -> every; `@every 5m` -> every 5m (robfig's descriptor); anything
    with spaces or a leading `@` -> cron."""
    text = text.strip()
    words = text.split()
    if len(words) == 2 and words[0].lower() == "@every":
        return {"every": words[1]}
    if " " in text or text.startswith("@"):
        return {"cron": text}
    return {"every": text}


def payload_of(data: str, payload_type: str | None) -> dict[str, str]:
    """A payload that parses as JSON is sent as JSON, anything else as text (unless the
    type is given)."""
    kind = payload_type
    if kind is None:
        try:
            json.loads(data)
            kind = "json"
        except ValueError:
            kind = "text"
    return {"type": kind, "data": data}


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
    """A new job document from the short form."""
    sched: dict[str, Any] = schedule_of(schedule)
    if tz:
        sched["timezone"] = tz
    if jitter:
        sched["jitter"] = jitter
    if grace:
        sched["grace"] = grace
    doc: dict[str, Any] = {"target": {"subject": subject}, "schedule": sched}
    if payload is not None:
        doc["payload"] = payload_of(payload, payload_type)
    if paused:
        doc["paused"] = True
    return doc


def merge(
    current: dict[str, Any],
    schedule: str,
    payload: str | None = None,
    payload_type: str | None = None,
    tz: str | None = None,
    jitter: str | None = None,
    grace: str | None = None,
    paused: bool | None = None,
) -> dict[str, Any]:
    """`current` (a job as `get` returns it) with only what was given changed: the
    schedule always; payload, zone, jitter, grace and paused when given. Everything else
    (start, end, a payload's type, ...) is kept; run state is left out. A zone is dropped
    when the schedule becomes an interval (it has no effect there) unless `tz` is given."""
    old_schedule = dict(current.get("schedule") or {})
    sched = {k: v for k, v in old_schedule.items() if k not in _KINDS}
    new = schedule_of(schedule)
    sched.update(new)
    if "every" in new:
        sched.pop("timezone", None)
    if tz:
        sched["timezone"] = tz
    if jitter is not None:
        sched["jitter"] = jitter
    if grace is not None:
        sched["grace"] = grace
    doc: dict[str, Any] = {"target": dict(current["target"]), "schedule": sched}
    old_payload = current.get("payload")
    if payload is not None:
        doc["payload"] = payload_of(payload, payload_type)
    elif old_payload:
        doc["payload"] = dict(old_payload)
        if payload_type is not None:
            doc["payload"]["type"] = payload_type
    doc["paused"] = bool(current.get("paused")) if paused is None else paused
    return doc


def definition(job: dict[str, Any]) -> dict[str, Any]:
    """A job document without run state or revision: what `export` writes."""
    keep = ("target", "payload", "schedule", "paused")
    return {key: job[key] for key in keep if key in job}
