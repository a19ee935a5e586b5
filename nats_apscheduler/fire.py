"""What a fire is: the message with its headers, its event, and the write of a whole batch of
them to the socket, behind the fence; and, for runs that await a reply, what their outcome
does (event, run state, metrics, retry or dead letter).

`Firer.write(fires, skips)` builds every fire of a slice (one HPUB each, with
`Nats-Msg-Id`, `Nats-Cron-Job`, `Nats-Cron-Scheduled`, `Nats-Cron-Instance`,
`Nats-Cron-Epoch`, `Nats-Cron-Shard`, `Nats-Cron-Run-Id`, `Nats-Cron-Attempt`) and every
event of a publish (`fired`, `caught_up`) or of slots not fired (`missed`, `skipped`),
checks the fence, and writes them all in one socket write, with no await in between (see
`_wire`; `events` builds the events). Fires of `request` and `jetstream` jobs leave in
the same write with a reply subject (`delivery.Deliveries`); their event is written when
the reply (or its deadline) settles the run (`settle`), which also schedules the next
attempt (`RetryPort`) or sends the dead letter. Its collaborators are typed ports: a
`Fence`, the `Wire`, the `History` subjects, the `RunStates`, `Deliveries`, a `RetryPort`
and a `FireObserver` (the metrics).
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from loguru import logger

from nats_apscheduler._wire import Wire, hpub, pub
from nats_apscheduler.delivery import Deliveries, Outcome
from nats_apscheduler.errors import NotLeaderError
from nats_apscheduler.events import Run, Skip, dead_letter, outcome_record, skip_record
from nats_apscheduler.history import History, RunStates
from nats_apscheduler.plan import FirePlan, Plans, jitter_delay, rfc3339, slot_ms, ulid
from nats_apscheduler.protocol import MSG_ID, dead_subject

FIRE_REF = "nats_apscheduler.fire:fire"

# Headers of every fire (SPEC §3, §10); Nats-Msg-Id is `<subject>:<slot, unix ms>`.
H_JOB = "Nats-Cron-Job"
H_SCHEDULED = "Nats-Cron-Scheduled"
H_INSTANCE = "Nats-Cron-Instance"
H_EPOCH = "Nats-Cron-Epoch"
H_SHARD = "Nats-Cron-Shard"
H_RUN_ID = "Nats-Cron-Run-Id"  # `<subject>:<slot, unix ms>:<attempt>`
H_ATTEMPT = "Nats-Cron-Attempt"  # 1 for the slot's first attempt

__all__ = [
    "FIRE_REF",
    "Fence",
    "Fire",
    "FireObserver",
    "FirePlan",
    "Firer",
    "Plans",
    "RetryPort",
    "Run",
    "Skip",
    "fire",
    "jitter_delay",
    "rfc3339",
    "slot_ms",
    "ulid",
]


async def fire(**kwargs: Any) -> None:
    """The reference every nats-cron job names; only a nats-cron leader's term fires them.

    Called directly (outside a nats-cron instance) it refuses, since only an elected
    leader may publish.
    """
    raise NotLeaderError("nats-cron jobs fire only through a nats-cron instance's leader")


@dataclass(slots=True)
class Fire:
    """One attempt of one slot of one job to publish."""

    plan: FirePlan
    slot: datetime
    caught_up: bool = False  # fired late: a missed slot after an outage or takeover
    attempt: int = 1


class Fence(Protocol):
    def is_leader_now(self) -> bool: ...


class FireObserver(Protocol):
    """Told what was fired, skipped and how runs ended (the metrics)."""

    def on_fire(
        self, subject: str, outcome: str, lateness: float, caught_up: bool, at: float = 0.0
    ) -> None: ...

    def on_sent(self, subject: str, lateness: float, caught_up: bool) -> None: ...

    def on_outcome(self, subject: str, outcome: str, at: float) -> None: ...

    def on_missed(self, subject: str, count: int = 1) -> None: ...

    def on_dead_letter(self, subject: str) -> None: ...


class RetryPort(Protocol):
    """Where a failed attempt's next attempt is kept (`retry.Retries`, persisted in KV)."""

    def schedule(
        self, subject: str, slot: datetime, attempt: int, due: datetime, caught_up: bool
    ) -> None: ...

    def done(self, subject: str, slot: datetime) -> None: ...


class Firer:
    """Writes the fires of one instance's term, and settles their runs."""

    def __init__(
        self,
        wire: Wire,
        fence: Fence,
        instance_id: str,
        history: History | None,
        states: RunStates,
        observer: FireObserver | None = None,
        shard: int = 0,
        deliveries: Deliveries | None = None,
        retries: RetryPort | None = None,
    ) -> None:
        self._wire = wire
        self.shard = shard
        self._fence = fence
        self.instance_id = instance_id
        self._history = history
        self._states = states
        self._observer = observer
        self._deliveries = deliveries
        self.retries = retries
        self.epoch = 0
        self.closed = False  #: the term ended: outcomes are recorded, nothing is retried
        # Header values must not break the header block: the instance id is the operator's.
        self._instance_header = instance_id.replace("\r", " ").replace("\n", " ")
        self._instance_json = json.dumps(instance_id)
        self._slot_text: tuple[datetime | None, str] = (None, "")
        #: Runs of each job in flight or waiting for their next attempt (overlap: skip).
        self.running: collections.Counter[str] = collections.Counter()
        self.written = 0  #: fires written in this process
        self.late_writes = 0  #: slices written after the fence had passed (a stall between)
        self.dead_letters = 0
        # Outcome events and dead letters of settled runs, written once per loop turn (one
        # socket write for all the replies a turn delivered, not one each).
        self._settled: list[bytes] = []
        self._flush: asyncio.Handle | None = None

    def _scheduled(self, slot: datetime) -> str:
        # A herd shares its slot: format it once.
        if self._slot_text[0] != slot:
            self._slot_text = (slot, rfc3339(slot))
        return self._slot_text[1]

    def room(self) -> int:
        """How many more request/JetStream fires may be sent now (the in-flight bound)."""
        return self._deliveries.room() if self._deliveries is not None else 1 << 30

    def write(self, fires: Sequence[Fire], skips: Sequence[Skip] = ()) -> bool:
        """Write `fires` and the events of publishes and skipped slots, if the fence holds.

        False: fenced (nothing written; the slots stay for the next leader) or not connected.
        """
        if not fires and not skips:
            return True
        if self._settled:
            self._write_settled()  # the events of settled runs first: they are older
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
        deliveries = self._deliveries
        commands: list[bytes] = []
        runs: list[tuple[str, str, int, str]] = []
        published: list[Fire] = []
        tracked: list[tuple[str, Run]] = []
        # Skipped slots first: a caught-up fire of the same job is the newer record, and the
        # newest record per job is what a follower rebuilds the run state from.
        if history is not None:
            for skip in skips:
                event = skip_record(
                    skip, states.get(skip.subject), self.instance_id, self.epoch, actual
                )
                commands.append(pub(history.subject(skip.subject), event))
        for item in fires:
            plan = item.plan
            subject = plan.subject
            ms = int(item.slot.timestamp() * 1000)
            scheduled = self._scheduled(item.slot)
            attempt = item.attempt
            header = (
                f"NATS/1.0\r\n{MSG_ID}: {subject}:{ms}\r\n{H_JOB}: {subject}\r\n"
                f"{H_SCHEDULED}: {scheduled}\r\n{H_RUN_ID}: {subject}:{ms}:{attempt}\r\n"
                f"{H_ATTEMPT}: {attempt}\r\n{tail}"
            ).encode()
            body = plan.body or ulid(ms)
            if deliveries is not None and plan.delivery.mode != "publish":
                reply = deliveries.reply_subject()
                commands.append(hpub(subject, reply, header, body))
                run = Run(plan, item.slot, attempt, item.caught_up, actual_text, header, body)
                tracked.append((reply, run))
                continue
            commands.append(hpub(subject, "", header, body))
            published.append(item)
            outcome = "caught_up" if item.caught_up else "fired"
            state = states.get(subject)
            count = (state.run_count if state is not None else 0) + (attempt == 1)
            runs.append((subject, scheduled, count, outcome))
            if history is not None:
                record = (
                    f'{{"subject":"{subject}","scheduled":"{scheduled}",'
                    f'"actual":"{actual_text}","attempt":{attempt},"outcome":"{outcome}",'
                    f'"duration":null,"error":null,"instance":{self._instance_json},'
                    f'"epoch":{epoch},"run_id":"{subject}:{ms}:{attempt}","runs":{count}}}'
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
            states.state(skip.subject).last_outcome = skip.kind
        for subject, scheduled, count, outcome in runs:
            state = states.state(subject)
            state.last_scheduled = scheduled
            state.last_run = actual_text
            state.run_count = count
            state.last_error = None
            state.last_outcome = outcome
            state.last_success = actual_text
            state.consecutive_failures = 0
        observer = self._observer
        if tracked:
            assert deliveries is not None
            for reply, run in tracked:
                plan = run.plan
                subject = plan.subject
                timeout = plan.delivery.timeout
                deliveries.track(
                    reply,
                    run,
                    self,
                    plan.delivery.mode,
                    timeout.total_seconds() if timeout is not None else 30.0,
                )
                state = states.state(subject)
                state.last_scheduled = self._scheduled(run.slot)
                state.last_run = actual_text
                if run.attempt == 1:
                    state.run_count += 1
                    self.running[subject] += 1  # until its last attempt settles
                if observer is not None:
                    observer.on_sent(
                        subject,
                        actual_ts - run.slot.timestamp(),
                        run.caught_up and run.attempt == 1,
                    )
        if observer is not None:
            for item in published:
                observer.on_fire(
                    item.plan.subject,
                    "caught_up" if item.caught_up else "fired",
                    actual_ts - item.slot.timestamp(),
                    item.caught_up,
                    actual_ts,
                )
            for skip in skips:
                if skip.kind == "missed":
                    observer.on_missed(skip.subject, skip.count)
                else:
                    observer.on_outcome(skip.subject, skip.kind, actual_ts)
        return True

    # --- runs that await a reply ------------------------------------------------------------

    def settle(self, run: Run, outcome: Outcome) -> None:
        """A tracked attempt ended (`delivery.Deliveries` calls this once per attempt): its
        event and run state; then the next attempt (`retry`), the dead letter, or done."""
        plan = run.plan
        subject = plan.subject
        now = datetime.now(UTC)
        state = self._states.state(subject)
        state.last_outcome = outcome.outcome
        state.last_error = outcome.error
        if outcome.ok:
            state.last_success = run.actual
            state.consecutive_failures = 0
        else:
            state.consecutive_failures += 1
        retry = plan.delivery.retry
        next_attempt: datetime | None = None
        dead = False
        if not outcome.ok and retry is not None and not self.closed:
            if run.attempt < retry.attempts:
                next_attempt = now + retry.delay(run.attempt)
            else:
                dead = True
        extra: dict[str, Any] = {}
        if retry is not None:
            extra["attempts"] = retry.attempts
        if next_attempt is not None:
            extra["next_attempt"] = rfc3339(next_attempt)
        if dead:
            extra["dead_letter"] = dead_subject(subject)
        if self._history is not None:
            record = outcome_record(
                run, outcome, self._states.get(subject), self.instance_id, self.epoch, extra
            )
            self._settled.append(pub(self._history.subject(subject), record))
        if dead:
            self._settled.append(dead_letter(run, outcome, self._wire.max_payload()))
            self.dead_letters += 1
        if self._settled and self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._write_settled)
        if not outcome.ok:
            # Every attempt is an event; the log says only what an operator must act on
            # (warnings repeated within 10 s are written once, see `logs`).
            log = logger.bind(
                subject=subject,
                scheduled=self._scheduled(run.slot),
                attempt=run.attempt,
                outcome=outcome.outcome,
            )
            if dead:
                log.warning("run failed {} time(s): sent to the dead letter subject", run.attempt)
            else:
                log.debug("run attempt failed: {}", outcome.error)
        observer = self._observer
        if observer is not None:
            observer.on_outcome(subject, outcome.outcome, now.timestamp())
            if dead:
                observer.on_dead_letter(subject)
        retries = self.retries
        if next_attempt is not None and retries is not None:
            retries.schedule(subject, run.slot, run.attempt + 1, next_attempt, run.caught_up)
            return  # still running
        if retries is not None and run.attempt > 1 and not self.closed:
            retries.done(subject, run.slot)
        if self.running[subject] > 0:
            self.running[subject] -= 1
            if not self.running[subject]:
                del self.running[subject]

    def _write_settled(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        commands, self._settled = self._settled, []
        if not commands:
            return
        try:
            self._wire.write(commands, messages=len(commands))
        except ConnectionError:
            logger.warning("{} run outcome(s) not recorded: not connected", len(commands))

    def forget(self, subject: str) -> None:
        """A run of `subject` that will not be attempted again (its job is gone)."""
        if self.running[subject] > 0:
            self.running[subject] -= 1
            if not self.running[subject]:
                del self.running[subject]
