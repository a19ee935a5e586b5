"""What a job fires, read from its stored document once per version: `FirePlan` (subject,
body, jitter, delivery) and `Plans`; with the small pure helpers of a fire (RFC 3339 text,
slot milliseconds, the jitter delay, ULID bodies). Pure, no I/O.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.job import Job

from nats_apscheduler.durations import parse_duration
from nats_apscheduler.errors import SpecError
from nats_apscheduler.modes import PUBLISH, DeliverySpec
from nats_apscheduler.spec import delivery_of, payload_of, validate_subject


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def slot_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def jitter_delay(subject: str, slot: datetime, jitter: timedelta | float) -> float:
    """A delay in [0, jitter) derived from the job and the slot, the same on every instance."""
    seconds = jitter.total_seconds() if isinstance(jitter, timedelta) else jitter
    if seconds <= 0:
        return 0.0
    digest = hashlib.sha256(f"{subject}:{slot_ms(slot)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * seconds


# ULIDs: Crockford's base32, two characters (10 bits) per table lookup.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_ulid_stamp: tuple[int, str] = (-1, "")


def ulid(ms: int) -> bytes:
    """A ULID for the unix time `ms`: 10 characters of time, 16 of randomness (what the Go
    version sends as the body of a job without payload). Not for secrets."""
    global _ulid_stamp
    if _ulid_stamp[0] != ms:  # a herd shares its millisecond
        _ulid_stamp = (
            ms,
            "".join(_PAIRS[(ms >> shift) & 1023] for shift in (40, 30, 20, 10, 0)),
        )
    bits = random.getrandbits(80)
    noise = "".join(_PAIRS[(bits >> shift) & 1023] for shift in (70, 60, 50, 40, 30, 20, 10, 0))
    return (_ulid_stamp[1] + noise).encode()


@dataclass(frozen=True, slots=True)
class FirePlan:
    """What a job publishes: its subject, its body (None: a ULID per fire), its jitter, and
    how it is delivered (SPEC §10)."""

    subject: str
    body: bytes | None
    jitter: float  # seconds
    delivery: DeliverySpec = PUBLISH

    @classmethod
    def of(cls, job_id: str, document: Any) -> FirePlan:
        """From a stored (already validated) job document; SpecError if it is not one."""
        if not isinstance(document, dict):
            raise SpecError("job document", "missing from the stored job")
        target = document.get("target")
        subject = target.get("subject") if isinstance(target, dict) else None
        if not isinstance(subject, str) or subject != job_id:
            raise SpecError("target.subject", f"{subject!r} does not match job id {job_id!r}")
        validate_subject(subject)
        schedule = document.get("schedule")
        jitter = schedule.get("jitter") if isinstance(schedule, dict) else None
        seconds = parse_duration(jitter, "schedule.jitter").total_seconds() if jitter else 0.0
        return cls(
            subject,
            payload_of(document.get("payload")) or None,
            max(0.0, seconds),
            delivery_of(document.get("delivery")),
        )

    def delay(self, slot: datetime) -> float:
        return jitter_delay(self.subject, slot, self.jitter) if self.jitter else 0.0


class Plans:
    """`FirePlan`s per job, read once per stored version of its document."""

    def __init__(self) -> None:
        self._plans: dict[str, tuple[Any, FirePlan]] = {}

    def of(self, job: Job) -> FirePlan:
        document = job.kwargs.get("job")
        cached = self._plans.get(job.id)
        if cached is not None and cached[0] is document:
            return cached[1]
        plan = FirePlan.of(job.id, document)
        self._plans[job.id] = (document, plan)
        return plan

    def delay(self, job: Job, slot: datetime) -> float:
        """The job's jitter delay of `slot` (0 without jitter; read without a full plan, so
        that building a new term's agenda of 100,000 jobs stays cheap)."""
        document = job.kwargs.get("job")
        schedule = document.get("schedule") if isinstance(document, dict) else None
        if not isinstance(schedule, dict) or not schedule.get("jitter"):
            return 0.0
        try:
            return self.of(job).delay(slot)
        except SpecError:
            return 0.0

    def forget(self, job_id: str) -> None:
        self._plans.pop(job_id, None)
