"""JSON codec for APScheduler jobs and triggers: what the job store writes to KV. No pickle.

A record is a versioned JSON object; a job's function is stored as its textual
reference and resolved by the store against its allow-list, never imported blindly.
Triggers: our `EveryTrigger` and `StandardCronTrigger`, APScheduler's `IntervalTrigger`,
`CronTrigger`, `DateTrigger`, and `AndTrigger`/`OrTrigger` over any of these.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.job import Job
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import AndTrigger, OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from nats_apscheduler.cron import StandardCronTrigger
from nats_apscheduler.errors import RecordError
from nats_apscheduler.spec import EveryTrigger

RECORD_VERSION = 1
_OFFSET = re.compile(r"^([+-])(\d\d):(\d\d)(?::(\d\d))?$")
_US = timedelta(microseconds=1)


def encode_tz(zone: tzinfo | None) -> str | None:
    if zone is None:
        return None
    if isinstance(zone, ZoneInfo):
        return zone.key
    if zone is UTC or zone == UTC:
        return "UTC"
    if isinstance(zone, timezone):
        offset = zone.utcoffset(None)
        sign = "-" if offset < timedelta(0) else "+"
        seconds = abs(int(offset.total_seconds()))
        return f"{sign}{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    name = getattr(zone, "key", None) or getattr(zone, "zone", None)
    if isinstance(name, str):
        return name
    raise ValueError(f"cannot serialise time zone {zone!r}: use a zoneinfo.ZoneInfo")


def decode_tz(name: str | None) -> tzinfo | None:
    if name is None:
        return None
    if name == "UTC":
        return UTC
    match = _OFFSET.match(name)
    if match:
        sign, hours, minutes, seconds = match.groups()
        delta = timedelta(hours=int(hours), minutes=int(minutes), seconds=int(seconds or 0))
        return timezone(-delta if sign == "-" else delta)
    return ZoneInfo(name)


def _dt(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _undt(text: str | None, zone: tzinfo | None = None) -> datetime | None:
    if text is None:
        return None
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {text!r} in record")
    return value.astimezone(zone) if zone is not None else value


def encode_trigger(trigger: BaseTrigger) -> dict[str, Any]:
    """A JSON-able description of `trigger`; ValueError for a type we cannot store."""
    if isinstance(trigger, EveryTrigger):
        return {
            "type": "every",
            "interval_us": trigger.interval // _US,
            "anchor": _dt(trigger.anchor),
            "end": _dt(trigger.end_date),
        }
    if isinstance(trigger, StandardCronTrigger):
        return {
            "type": "standard-cron",
            "expression": trigger.expression,
            "timezone": encode_tz(trigger.timezone),
            "start": _dt(trigger.start_date),
            "end": _dt(trigger.end_date),
        }
    if isinstance(trigger, IntervalTrigger):
        return {
            "type": "interval",
            "interval_us": trigger.interval // _US,
            "timezone": encode_tz(trigger.timezone),
            "start": _dt(trigger.start_date),
            "end": _dt(trigger.end_date),
            "jitter": trigger.jitter,
        }
    if isinstance(trigger, CronTrigger):
        return {
            "type": "cron",
            "fields": {f.name: str(f) for f in trigger.fields if not f.is_default},
            "timezone": encode_tz(trigger.timezone),
            "start": _dt(trigger.start_date),
            "end": _dt(trigger.end_date),
            "jitter": trigger.jitter,
        }
    if isinstance(trigger, DateTrigger):
        return {"type": "date", "run_date": _dt(trigger.run_date)}
    if isinstance(trigger, AndTrigger | OrTrigger):
        return {
            "type": "and" if isinstance(trigger, AndTrigger) else "or",
            "triggers": [encode_trigger(t) for t in trigger.triggers],
            "jitter": trigger.jitter,
        }
    raise ValueError(f"the JetStream job store cannot serialise {type(trigger).__name__} triggers")


def decode_trigger(data: dict[str, Any]) -> BaseTrigger:
    kind = data["type"]
    if kind == "every":
        anchor = _undt(data["anchor"])
        assert anchor is not None
        return EveryTrigger(data["interval_us"] * _US, anchor, _undt(data["end"]))
    if kind == "standard-cron":
        zone = decode_tz(data["timezone"])
        assert zone is not None
        return StandardCronTrigger(
            data["expression"], zone, _undt(data["start"], zone), _undt(data["end"], zone)
        )
    if kind == "interval":
        zone = decode_tz(data["timezone"])
        return IntervalTrigger(
            seconds=data["interval_us"] / 1_000_000,
            start_date=_undt(data["start"], zone),
            end_date=_undt(data["end"], zone),
            timezone=zone,
            jitter=data["jitter"],
        )
    if kind == "cron":
        zone = decode_tz(data["timezone"])
        return CronTrigger(
            **data["fields"],
            start_date=_undt(data["start"], zone),
            end_date=_undt(data["end"], zone),
            timezone=zone,
            jitter=data["jitter"],
        )
    if kind == "date":
        run_date = _undt(data["run_date"])
        assert run_date is not None
        return DateTrigger(run_date=run_date, timezone=run_date.tzinfo)
    if kind in ("and", "or"):
        triggers = [decode_trigger(t) for t in data["triggers"]]
        cls = AndTrigger if kind == "and" else OrTrigger
        return cls(triggers, jitter=data["jitter"])
    raise ValueError(f"unknown trigger type {kind!r}")


def encode_job(job: Job, writer: str) -> bytes:
    """The KV record of `job`; ValueError if any part cannot be stored as JSON."""
    return _encode_record(job, writer, _dumps(encode_trigger(job.trigger), job))


class RecordEncoder:
    """`encode_job` that encodes each job's trigger once per trigger object.

    A fire re-encodes its job's record to store the new next run time; the trigger, most
    of the work, does not change (APScheduler replaces a job's trigger object when it is
    rescheduled and never changes one in place).
    """

    def __init__(self) -> None:
        self._triggers: dict[str, tuple[BaseTrigger, str]] = {}

    def encode(self, job: Job, writer: str) -> bytes:
        cached = self._triggers.get(job.id)
        if cached is None or cached[0] is not job.trigger:
            cached = self._triggers[job.id] = (
                job.trigger,
                _dumps(encode_trigger(job.trigger), job),
            )
        return _encode_record(job, writer, cached[1])

    def forget(self, job_id: str) -> None:
        self._triggers.pop(job_id, None)

    def clear(self) -> None:
        self._triggers.clear()


def _dumps(value: Any, job: Job) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"job {job.id!r}: args and kwargs must be JSON-serialisable ({exc})"
        ) from exc


def _encode_record(job: Job, writer: str, trigger: str) -> bytes:
    if not job.func_ref:
        raise ValueError(f"job {job.id!r}: its function has no textual reference (module:name)")
    record = {
        "v": RECORD_VERSION,
        "id": job.id,
        "func": job.func_ref,
        "args": list(job.args),
        "kwargs": dict(job.kwargs),
        "name": job.name,
        "executor": job.executor,
        "misfire_grace_time": job.misfire_grace_time,
        "coalesce": job.coalesce,
        "max_instances": job.max_instances,
        "next_run_time": _dt(job.next_run_time),
    }
    # The trigger and the writer last, in that order: `"writer":"<id>"}` ends every record
    # (the store recognises the echo of its own writes by it).
    head = _dumps(record, job)
    return f'{head[:-1]},"trigger":{trigger},"writer":{json.dumps(writer)}}}'.encode()


def decode_record(raw: bytes) -> dict[str, Any]:
    """Parse and check a record's envelope; RecordError for anything unreadable."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"not JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise RecordError("not a JSON object")
    version = record.get("v")
    if version != RECORD_VERSION:
        raise RecordError(f"unsupported record version {version!r}")
    return record


def build_job(record: dict[str, Any], func: Any) -> Job:
    """A Job from a decoded record and its already-resolved function (no imports here)."""
    try:
        trigger = decode_trigger(record["trigger"])
        job = Job.__new__(Job)
        job.id = record["id"]
        job.func_ref = record["func"]
        job.func = func
        job.trigger = trigger
        job.executor = record["executor"]
        job.args = tuple(record["args"])
        job.kwargs = dict(record["kwargs"])
        job.name = record["name"]
        job.misfire_grace_time = record["misfire_grace_time"]
        job.coalesce = bool(record["coalesce"])
        job.max_instances = int(record["max_instances"])
        zone = getattr(trigger, "timezone", None)
        job.next_run_time = _undt(record["next_run_time"], zone)
    except (KeyError, TypeError, ValueError, AttributeError, AssertionError) as exc:
        raise RecordError(f"malformed record ({type(exc).__name__}: {exc})") from exc
    if not isinstance(job.id, str):
        raise RecordError("malformed record (id is not a string)")
    return job


_NEXT_RUN = b'"next_run_time":'


def peek_next_run_time(raw: bytes) -> datetime | None:
    """A record's `next_run_time`, read without decoding the record (ValueError if it has
    none that `encode_job` could have written). The field is the last of its name: only the
    trigger and the writer follow it, and neither has one."""
    at = raw.rfind(_NEXT_RUN)
    if at < 0 or not raw.startswith(b'{"v":1,'):
        raise ValueError("not a record of this format")
    at += len(_NEXT_RUN)
    if raw.startswith(b"null", at):
        return None
    if raw[at : at + 1] != b'"':
        raise ValueError("next_run_time is not a string")
    end = raw.index(b'"', at + 1)
    value = datetime.fromisoformat(raw[at + 1 : end].decode("ascii"))
    if value.tzinfo is None:
        raise ValueError("naive next_run_time")
    return value
