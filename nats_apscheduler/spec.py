"""The job document (SPEC §2, §10): parsing, validation and the triggers it builds. Pure, no I/O.

`parse_job(document)` returns a `JobSpec` or raises `SpecError(field, rule)`; no input,
however malformed, raises anything else. pydantic checks the document's shape and
types; the rules of subjects, durations, cron, zones, payloads and delivery live here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger
from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictStr,
    ValidationError,
)
from ulid import ULID

from nats_apscheduler.cron import StandardCronTrigger, parse_cron
from nats_apscheduler.durations import format_duration, parse_duration
from nats_apscheduler.errors import SpecError
from nats_apscheduler.modes import (
    PUBLISH,
    DeliveryField,
    DeliverySpec,
    parse_delivery,
)

SERVICE_PREFIX = "nats-cron"
DEFAULT_MIN_INTERVAL = timedelta(seconds=1)
MAX_SUBJECT_LENGTH = 256
# Bytes kept free for the headers of a fire (plus 3x the subject, which three of them
# repeat): the Nats-Cron-* headers, and on a dead letter its outcome and error.
HEADER_RESERVE = 640
_TOKEN = re.compile(r"[-/_=a-zA-Z0-9]+")
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})?$"
)
_TZ_PREFIX = re.compile(r"^(CRON_TZ|TZ)=(\S*)(\s*)(.*)$", re.DOTALL)
_EVERY_DESCRIPTOR = re.compile(r"^@every\s+(\S+)$", re.IGNORECASE)
PayloadType = Literal["json", "text", "base64"]


# --- small parsers --------------------------------------------------------------------


def parse_timezone(name: str, where: str) -> tzinfo:
    """An IANA zone name (`Europe/Berlin`, `UTC`)."""
    if not name or name.startswith(("/", ".")) or ".." in name or "\x00" in name:
        raise SpecError(where, f"{name!r} is not an IANA time zone name")
    try:
        return ZoneInfo(name)
    except Exception as exc:  # ZoneInfoNotFoundError, ValueError, OSError...
        raise SpecError(where, f"unknown time zone {name!r}") from exc


def parse_time(text: str, where: str) -> datetime:
    """An RFC 3339 timestamp with an offset (`2026-01-02T03:04:05Z`)."""
    if not _RFC3339.match(text):
        raise SpecError(where, f"{text!r} is not an RFC 3339 timestamp (e.g. 2026-01-02T03:04:05Z)")
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise SpecError(where, f"{text!r} is not an RFC 3339 timestamp") from exc
    if value.tzinfo is None:
        raise SpecError(where, f"{text!r} has no UTC offset (add Z or +hh:mm)")
    return value


def validate_subject(subject: str, where: str = "target.subject") -> str:
    """A concrete publish subject: no wildcards, no `$` API subjects, not our own API."""
    if not subject:
        raise SpecError(where, "is empty")
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise SpecError(where, f"is longer than {MAX_SUBJECT_LENGTH} characters")
    if subject.startswith("$"):
        raise SpecError(where, f"{subject!r}: subjects starting with $ are reserved for NATS")
    tokens = subject.split(".")
    if tokens[0] == SERVICE_PREFIX:
        raise SpecError(where, f"{subject!r}: the {SERVICE_PREFIX}. prefix is the API's own")
    for token in tokens:
        if token in ("*", ">") or "*" in token or ">" in token:
            raise SpecError(where, f"{subject!r}: wildcards are not allowed in a job subject")
        if not token:
            raise SpecError(where, f"{subject!r}: empty token (leading, trailing or double dot)")
        if not _TOKEN.fullmatch(token):
            raise SpecError(
                where, f"{subject!r}: tokens may use only letters, digits and - / _ = (no spaces)"
            )
    return subject


# --- triggers -------------------------------------------------------------------------


class EveryTrigger(BaseTrigger):  # type: ignore[misc]
    """A fixed interval anchored at `anchor`: fires at anchor + k·interval, never drifting.

    Unlike APScheduler's `IntervalTrigger` (previous + interval), the slot is computed
    from the anchor, so phase survives restarts, failovers and late fires.
    """

    __slots__ = ("anchor", "end_date", "interval")

    def __init__(self, interval: timedelta, anchor: datetime, end_date: datetime | None = None):
        if interval <= timedelta(0):
            raise ValueError("interval must be positive")
        self.interval = interval
        self.anchor = anchor.astimezone(UTC)
        self.end_date = end_date

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        after = previous_fire_time if previous_fire_time is not None else now
        if previous_fire_time is None and now < self.anchor:
            result = self.anchor
        else:
            steps = (after - self.anchor) // self.interval + 1
            result = self.anchor + steps * self.interval
        if self.end_date is not None and result > self.end_date:
            return None
        return result

    def __getstate__(self) -> dict[str, Any]:
        return {"interval": self.interval, "anchor": self.anchor, "end_date": self.end_date}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["interval"], state["anchor"], state["end_date"])  # type: ignore[misc]

    def __str__(self) -> str:
        return f"every[{self.interval}]"

    def __repr__(self) -> str:
        return f"<EveryTrigger (interval={self.interval!r}, anchor={self.anchor.isoformat()})>"


# --- the document ---------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Target(_Strict):
    subject: StrictStr


class _Payload(_Strict):
    type: StrictStr | None = None
    data: Any = None


class _Schedule(_Strict):
    every: StrictStr | None = None
    cron: StrictStr | None = None
    at: StrictStr | None = None
    timezone: StrictStr | None = None
    jitter: StrictStr | None = None
    grace: StrictStr | None = None
    start: StrictStr | None = None
    end: StrictStr | None = None
    paused: StrictBool | None = None


class _Document(_Strict):
    target: _Target
    payload: _Payload | None = None
    schedule: _Schedule
    delivery: DeliveryField | None = None
    paused: StrictBool | None = None


# Run-state fields that a `get` reply carries; accepted and ignored on input so a client
# can send back what it read (the API's `update` reads `revision` as a precondition).
_READ_ONLY = (
    "next_run",
    "last_run",
    "run_count",
    "last_error",
    "last_scheduled",
    "last_outcome",
    "last_success",
    "consecutive_failures",
    "revision",
)


@dataclass(frozen=True)
class JobSpec:
    """A validated job: what to publish where, and when."""

    subject: str
    payload_type: PayloadType | None
    payload_data: str | None
    every: timedelta | None = None
    every_text: str | None = None
    cron: str | None = None  # without any TZ prefix
    at: datetime | None = None
    timezone: str = "UTC"
    jitter: timedelta = timedelta(0)
    grace: timedelta | None = None
    start: datetime | None = None
    end: datetime | None = None
    paused: bool = False
    payload_bytes: bytes | None = field(default=None, repr=False)
    delivery: DeliverySpec = PUBLISH

    @property
    def kind(self) -> str:
        return "every" if self.every else "cron" if self.cron else "at"

    def trigger(self, now: datetime) -> BaseTrigger:
        """The APScheduler trigger; an `every` job is anchored at `start` or `now`."""
        zone = ZoneInfo(self.timezone)
        if self.every is not None:
            return EveryTrigger(self.every, self.start or now, self.end)
        if self.cron is not None:
            return StandardCronTrigger(self.cron, zone, self.start, self.end)
        assert self.at is not None
        return DateTrigger(run_date=self.at, timezone=zone)

    def payload(self, fire_time: datetime) -> bytes:
        """The message body for a fire at `fire_time`: the payload, or a ULID of the time."""
        if self.payload_bytes:
            return self.payload_bytes
        return str(ULID.from_datetime(fire_time)).encode()

    def to_document(self) -> dict[str, Any]:
        """The canonical job document (README schema), as the API returns it."""
        schedule: dict[str, Any] = {}
        if self.every_text is not None:
            schedule["every"] = self.every_text
        if self.cron is not None:
            schedule["cron"] = self.cron
        if self.at is not None:
            schedule["at"] = self.at.isoformat()
        if self.timezone != "UTC" or self.cron is not None:
            schedule["timezone"] = self.timezone
        if self.jitter:
            schedule["jitter"] = format_duration(self.jitter)
        if self.grace is not None:
            schedule["grace"] = format_duration(self.grace)
        if self.start is not None:
            schedule["start"] = self.start.isoformat()
        if self.end is not None:
            schedule["end"] = self.end.isoformat()
        doc: dict[str, Any] = {"target": {"subject": self.subject}, "schedule": schedule}
        if self.payload_data is not None:
            payload: dict[str, Any] = {"data": self.payload_data}
            if self.payload_type is not None:
                payload["type"] = self.payload_type
            doc["payload"] = payload
        delivery = self.delivery.to_document()
        if delivery is not None:
            doc["delivery"] = delivery
        doc["paused"] = self.paused
        return doc


def _pydantic_to_spec_error(exc: ValidationError) -> SpecError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return SpecError(where, "unknown field")
    if first["type"] == "missing":
        return SpecError(where, "is required")
    if first["type"] == "model_type":  # pydantic names our private model class here
        return SpecError(where, f"must be a JSON object, not {_json_type(first.get('input'))}")
    return SpecError(where, first["msg"][0].lower() + first["msg"][1:])


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, int | float) else "value")


def _normalise(document: Any) -> Any:
    """Accept the Go v0.2 flat form and strip read-only run-state fields."""
    if not isinstance(document, dict):
        raise SpecError("job document", f"must be a JSON object, not {_json_type(document)}")
    doc = {k: v for k, v in document.items() if k not in _READ_ONLY}
    if "subject" in doc and "target" not in doc:
        doc["target"] = {"subject": doc.pop("subject")}
    return doc


def _payload(
    raw: _Payload | None, room: int | None, max_payload: int | None
) -> tuple[Any, str | None, bytes | None]:
    if raw is None:
        return None, None, None
    kind, data = raw.type, raw.data
    if kind not in (None, "json", "text", "base64"):
        raise SpecError("payload.type", f"{kind!r} is not one of json, text, base64")
    if data is None or data == "":
        return kind, None, None
    if kind == "json" and not isinstance(data, str):
        # Convenience: a JSON value instead of a string holding JSON.
        data = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    if not isinstance(data, str):
        raise SpecError("payload.data", f"must be a string, not {type(data).__name__}")
    if kind == "json":
        try:
            json.loads(data)
        except ValueError as exc:
            raise SpecError("payload.data", f"is not valid JSON ({exc})") from exc
    if kind == "base64":
        try:
            body = base64.b64decode(data.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise SpecError("payload.data", "is not valid base64") from exc
    else:
        try:
            body = data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SpecError("payload.data", "is not valid UTF-8 text") from exc
    if room is not None and len(body) > room:
        raise SpecError(
            "payload.data",
            f"is {len(body)} bytes; with the fire headers it exceeds the server's max_payload "
            f"of {max_payload} (at most {max(room, 0)} bytes fit)",
        )
    return kind, data, body


def _split_tz_prefix(cron: str) -> tuple[str | None, str]:
    match = _TZ_PREFIX.match(cron.strip())
    if match is None:
        return None, cron.strip()
    prefix, zone, space, rest = match.groups()
    if not zone:
        raise SpecError(
            "schedule.cron", f"{prefix}= needs a zone name, e.g. {prefix}=Europe/Berlin"
        )
    if not space or not rest:
        raise SpecError(
            "schedule.cron", f"{prefix}={zone} must be followed by a space and the cron fields"
        )
    return zone, rest


def parse_job(
    document: Any,
    *,
    min_interval: timedelta = DEFAULT_MIN_INTERVAL,
    max_payload: int | None = None,
    now: datetime | None = None,
    strict: bool = False,
) -> JobSpec:
    """Validate a job document (README schema or Go v0.2 flat form) into a `JobSpec`.

    `strict` adds the rules that came after jobs may already have been stored (a zone on
    an `every` schedule, which has no effect): the API and `validate` apply them to new
    documents; a stored record is read leniently, so that a job accepted once keeps firing.
    """
    try:
        return _parse_job(
            document, min_interval, max_payload, now or datetime.now(UTC), strict=strict
        )
    except SpecError:
        raise
    except ValidationError as exc:
        raise _pydantic_to_spec_error(exc) from None
    except (ValueError, TypeError, OverflowError, ArithmeticError, RecursionError) as exc:
        # A rule we did not name: still a validation error, never a crash.
        raise SpecError("job document", f"invalid ({type(exc).__name__}: {exc})") from exc


def _parse_job(
    document: Any, min_interval: timedelta, max_payload: int | None, now: datetime, strict: bool
) -> JobSpec:
    doc = _Document.model_validate(_normalise(document))
    subject = validate_subject(doc.target.subject)
    # A fire adds the Nats-Cron-* headers (3x the subject plus ~300 bytes; a dead letter
    # some more) to the body, and the whole message must fit the server's max_payload.
    room = None if max_payload is None else max_payload - HEADER_RESERVE - 3 * len(subject)
    kind, data, body = _payload(doc.payload, room, max_payload)
    sched = doc.schedule
    given = [name for name in ("every", "cron", "at") if getattr(sched, name) is not None]
    if len(given) != 1:
        detail = "none given" if not given else f"got {', '.join(given)}"
        raise SpecError("schedule", f"needs exactly one of every, cron, at ({detail})")

    zone_name = sched.timezone
    if zone_name is not None:
        parse_timezone(zone_name, "schedule.timezone")
    every = cron = None
    every_text, every_where = sched.every, "schedule.every"
    at = None
    if sched.cron is not None:
        prefix_zone, cron = _split_tz_prefix(sched.cron)
        if prefix_zone is not None:
            parse_timezone(prefix_zone, "schedule.cron")
            if zone_name is not None and zone_name != prefix_zone:
                raise SpecError(
                    "schedule.cron",
                    f"zone {prefix_zone!r} conflicts with schedule.timezone {zone_name!r}",
                )
            zone_name = prefix_zone
        descriptor = _EVERY_DESCRIPTOR.match(cron)
        if descriptor is not None:
            # robfig/cron's `@every <duration>`: an interval, stored as `every`.
            every_text, every_where, cron = descriptor.group(1), "schedule.cron", None
            if strict and prefix_zone is not None:
                raise SpecError(
                    "schedule.cron",
                    f"a zone has no effect on {sched.cron.strip()!r} (an interval does not "
                    "depend on the time zone): remove it",
                )
        elif cron.lower().split()[:1] == ["@every"]:
            raise SpecError("schedule.cron", f"{cron!r}: @every needs a duration, e.g. @every 5m")
        else:
            parse_cron(cron)
    if every_text is not None:
        every = parse_duration(every_text, every_where)
        if every <= timedelta(0):
            raise SpecError(every_where, f"{every_text!r} must be positive")
        if every < min_interval:
            raise SpecError(
                every_where,
                f"{every_text!r} is below the minimum interval {format_duration(min_interval)}",
            )
        if strict and sched.timezone is not None:
            raise SpecError(
                "schedule.timezone",
                f"{sched.timezone!r} has no effect on an `every` schedule (an interval does not "
                "depend on the time zone): remove it, or use a cron schedule",
            )
    elif sched.at is not None:
        at = parse_time(sched.at, "schedule.at")

    jitter = parse_duration(sched.jitter, "schedule.jitter") if sched.jitter else timedelta(0)
    if jitter < timedelta(0):
        raise SpecError("schedule.jitter", f"{sched.jitter!r} must not be negative")
    grace = parse_duration(sched.grace, "schedule.grace") if sched.grace else None
    if grace is not None and grace < timedelta(0):
        raise SpecError("schedule.grace", f"{sched.grace!r} must not be negative")
    start = parse_time(sched.start, "schedule.start") if sched.start else None
    end = parse_time(sched.end, "schedule.end") if sched.end else None
    if start and end and end <= start:
        raise SpecError("schedule.end", "must be after schedule.start")
    paused = bool(doc.paused) or bool(sched.paused)
    delivery = parse_delivery(doc.delivery)

    spec = JobSpec(
        subject=subject,
        payload_type=kind,
        payload_data=data,
        every=every,
        every_text=every_text,
        cron=cron,
        at=at,
        timezone=zone_name or "UTC",
        jitter=jitter,
        grace=grace,
        start=start,
        end=end,
        paused=paused,
        payload_bytes=body,
        delivery=delivery,
    )
    if cron is not None and spec.trigger(now).get_next_fire_time(None, start or now) is None:
        raise SpecError("schedule.cron", f"{cron!r} never fires (no date matches all fields)")
    return spec


def delivery_of(delivery: Any) -> DeliverySpec:
    """The delivery of a stored document's `delivery` field (the fire path reads documents
    from KV that passed `parse_job` already: the same rules)."""
    if delivery is None:
        return PUBLISH
    try:
        raw = DeliveryField.model_validate(delivery)
    except ValidationError as exc:
        error = _pydantic_to_spec_error(exc)
        raise SpecError(f"delivery.{error.field}", error.rule) from None
    return parse_delivery(raw)


def payload_of(payload: Any) -> bytes | None:
    """The message body of a stored document's `payload` field (None: a ULID per fire).

    For documents that passed `parse_job` already (the fire path reads them from KV): the
    same rules, without the size limit, which was checked when the document was accepted.
    """
    try:
        raw = None if payload is None else _Payload.model_validate(payload)
    except ValidationError as exc:
        error = _pydantic_to_spec_error(exc)
        raise SpecError(f"payload.{error.field}", error.rule) from None
    return _payload(raw, None, None)[2]
