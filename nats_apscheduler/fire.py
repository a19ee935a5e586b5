"""What a fire is: the message with its headers, its history record, and the write of a whole
batch of them to the socket, behind the fence.

`Firer.write(fires, skips)` builds every fire of a slice (one HPUB each, with
`Nats-Msg-Id`, `Nats-Cron-Job`, `Nats-Cron-Scheduled`, `Nats-Cron-Instance`,
`Nats-Cron-Epoch`, `Nats-Cron-Shard`) and every history record, checks the fence, and
writes them all in one socket write, with no await between the check and the write (see
`_wire`). Run state and metrics follow the write. Its collaborators are typed ports: a
`Fence`, the `Wire`, the `History` subjects, the `RunStates`, and a `FireObserver` (the
metrics).

A job document names what to publish; `FirePlan` is that, read once per stored version of
the document (`Plans`).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from apscheduler.job import Job
from loguru import logger

from nats_apscheduler._wire import Wire, hpub, pub
from nats_apscheduler.durations import parse_duration
from nats_apscheduler.errors import NotLeaderError, SpecError
from nats_apscheduler.history import History, RunStates
from nats_apscheduler.protocol import MSG_ID
from nats_apscheduler.spec import payload_of, validate_subject

FIRE_REF = "nats_apscheduler.fire:fire"

# Headers of every fire (SPEC §3); Nats-Msg-Id is `<subject>:<slot, unix ms>`.
H_JOB = "Nats-Cron-Job"
H_SCHEDULED = "Nats-Cron-Scheduled"
H_INSTANCE = "Nats-Cron-Instance"
H_EPOCH = "Nats-Cron-Epoch"
H_SHARD = "Nats-Cron-Shard"


async def fire(**kwargs: Any) -> None:
    """The reference every nats-cron job names; only a nats-cron leader's term fires them.

    Called directly (outside a nats-cron instance) it refuses, since only an elected
    leader may publish.
    """
    raise NotLeaderError("nats-cron jobs fire only through a nats-cron instance's leader")


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
    """What a job publishes: its subject, its body (None: a ULID per fire) and its jitter."""

    subject: str
    body: bytes | None
    jitter: float  # seconds

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
        return cls(subject, payload_of(document.get("payload")) or None, max(0.0, seconds))

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


@dataclass(slots=True)
class Fire:
    """One slot of one job to publish."""

    plan: FirePlan
    slot: datetime
    caught_up: bool = False  # fired late: a missed slot after an outage or takeover


@dataclass(slots=True)
class Skip:
    """Slots of one job that were due and will never fire (older than a caught-up slot, or
    past the grace window)."""

    subject: str
    count: int
    first: datetime
    last: datetime
    more: bool  # and slots before `first` (older than the grace window), not counted
    past_grace: bool  # none of this outage's slots fired


class Fence(Protocol):
    def is_leader_now(self) -> bool: ...


class FireObserver(Protocol):
    """Told what was fired and skipped (the metrics)."""

    def on_fire(self, subject: str, outcome: str, lateness: float, caught_up: bool) -> None: ...

    def on_missed(self, subject: str, count: int = 1) -> None: ...


class Firer:
    """Writes the fires of one instance's term."""

    def __init__(
        self,
        wire: Wire,
        fence: Fence,
        instance_id: str,
        history: History | None,
        states: RunStates,
        observer: FireObserver | None = None,
        shard: int = 0,
    ) -> None:
        self._wire = wire
        self.shard = shard
        self._fence = fence
        self.instance_id = instance_id
        self._history = history
        self._states = states
        self._observer = observer
        self.epoch = 0
        # Header values must not break the header block: the instance id is the operator's.
        self._instance_header = instance_id.replace("\r", " ").replace("\n", " ")
        self._instance_json = json.dumps(instance_id)
        self._slot_text: tuple[datetime | None, str] = (None, "")
        self.written = 0  #: fires written in this process
        self.late_writes = 0  #: slices written after the fence had passed (a stall between)

    def _scheduled(self, slot: datetime) -> str:
        # A herd shares its slot: format it once.
        if self._slot_text[0] != slot:
            self._slot_text = (slot, rfc3339(slot))
        return self._slot_text[1]

    def write(self, fires: Sequence[Fire], skips: Sequence[Skip] = ()) -> bool:
        """Write `fires` and the history records of fires and skips, if the fence holds.

        False: fenced (nothing written; the slots stay for the next leader) or not connected.
        """
        if not fires and not skips:
            return True
        epoch = self.epoch
        # The headers every fire of this write shares, closing the header block.
        tail = (
            f"{H_INSTANCE}: {self._instance_header}\r\n{H_EPOCH}: {epoch}\r\n"
            f"{H_SHARD}: {self.shard}\r\n\r\n"
        )
        actual = datetime.now(UTC)
        actual_text = rfc3339(actual)
        actual_ts = actual.timestamp()
        history = self._history
        states = self._states
        commands: list[bytes] = []
        runs: list[tuple[str, str, int, str]] = []
        # Skipped slots first: a caught-up fire of the same job is the newer record, and the
        # newest record per job is what a follower rebuilds the run state from.
        if history is not None:
            for skip in skips:
                commands.append(pub(history.subject(skip.subject), self._skip_record(skip)))
        for item in fires:
            plan = item.plan
            subject = plan.subject
            ms = int(item.slot.timestamp() * 1000)
            scheduled = self._scheduled(item.slot)
            header = (
                f"NATS/1.0\r\n{MSG_ID}: {subject}:{ms}\r\n{H_JOB}: {subject}\r\n"
                f"{H_SCHEDULED}: {scheduled}\r\n{tail}"
            ).encode()
            commands.append(hpub(subject, "", header, plan.body or ulid(ms)))
            outcome = "caught_up" if item.caught_up else "fired"
            state = states.get(subject)
            count = (state.run_count if state is not None else 0) + 1
            runs.append((subject, scheduled, count, outcome))
            if history is not None:
                record = (
                    f'{{"subject":"{subject}","scheduled":"{scheduled}",'
                    f'"actual":"{actual_text}","instance":{self._instance_json},'
                    f'"epoch":{epoch},"outcome":"{outcome}","error":null,"runs":{count}}}'
                )
                commands.append(pub(history.subject(subject), record.encode()))
        started = time.monotonic()
        if not self._fence.is_leader_now():
            return False
        try:
            self._wire.write(commands, messages=len(commands))
        except ConnectionError:
            return False
        if time.monotonic() - started > 0.1:
            # Frozen between the fence check and the write (SIGSTOP, a stall): these fires
            # may have gone out after the lease's deadline. Counted, and said loudly.
            self.late_writes += 1
            logger.bind(epoch=epoch).error(
                "fires written {:.3f} s after their fence check (the process stalled)",
                time.monotonic() - started,
            )
        self.written += len(fires)
        if fires:
            first = fires[0]
            logger.debug(
                "fired {} slot(s)",
                len(fires),
                subject=first.plan.subject,
                scheduled=self._scheduled(first.slot),
                epoch=epoch,
            )
        for skip in skips:
            states.state(skip.subject).last_outcome = "missed"
        for subject, scheduled, count, outcome in runs:
            state = states.state(subject)
            state.last_scheduled = scheduled
            state.last_run = actual_text
            state.run_count = count
            state.last_error = None
            state.last_outcome = outcome
        observer = self._observer
        if observer is not None:
            for item in fires:
                observer.on_fire(
                    item.plan.subject,
                    "caught_up" if item.caught_up else "fired",
                    actual_ts - item.slot.timestamp(),
                    item.caught_up,
                )
            for skip in skips:
                observer.on_missed(skip.subject, skip.count)
        return True

    def _skip_record(self, skip: Skip) -> bytes:
        if skip.past_grace:
            why = "past the grace window: not fired"
        else:
            why = "coalesced: only the latest missed slot fires"
        count = f"{skip.count}+" if skip.more else str(skip.count)
        state = self._states.get(skip.subject)
        return json.dumps(
            {
                "subject": skip.subject,
                "scheduled": rfc3339(skip.last),
                "actual": rfc3339(datetime.now(UTC)),
                "instance": self.instance_id,
                "epoch": self.epoch,
                "outcome": "missed",
                "error": f"{count} slot(s) from {rfc3339(skip.first)} to "
                f"{rfc3339(skip.last)} {why}",
                "skipped": skip.count,
                "first": rfc3339(skip.first),
                "last": rfc3339(skip.last),
                "more": skip.more,
                # The run state as it stands (the newest record per job rebuilds it).
                "runs": state.run_count if state is not None else 0,
                "last_scheduled": state.last_scheduled if state is not None else None,
                "last_run": state.last_run if state is not None else None,
                "last_error": state.last_error if state is not None else None,
            }
        ).encode()
