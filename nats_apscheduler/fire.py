"""What a fire does: the fence check, the publish with its headers, run state and history.

`FireExecutor` is the APScheduler executor of nats-cron jobs: it receives each job with
its scheduled run time (which plain job functions never see), applies the grace window,
and hands the slot to `Firer.fire`. The job's function reference, `FIRE_REF`, only names
the kind of job for the store's allow-list: nats-cron jobs run through the executor.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MISSED,
    JobExecutionEvent,
)
from apscheduler.executors.base import BaseExecutor
from apscheduler.job import Job
from loguru import logger
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, StreamConfig

from nats_apscheduler.errors import NotLeaderError, SpecError
from nats_apscheduler.spec import JobSpec, parse_job

FIRE_REF = "nats_apscheduler.fire:fire"
HISTORY_PREFIX = "nats-cron.history"


async def fire(**kwargs: Any) -> None:
    """The reference every nats-cron job names; `FireExecutor` runs such jobs.

    Called directly (outside a nats-cron instance) it refuses, since only an elected
    leader's executor may publish.
    """
    raise NotLeaderError("nats-cron jobs fire only through a nats-cron instance's FireExecutor")


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def slot_ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def jitter_delay(subject: str, slot: datetime, jitter: timedelta) -> float:
    """A delay in [0, jitter) derived from the job and the slot, the same on every instance."""
    if jitter <= timedelta(0):
        return 0.0
    digest = hashlib.sha256(f"{subject}:{slot_ms(slot)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * jitter.total_seconds()


@dataclass
class FireOutcome:
    status: str  # "fired" | "fenced" | "error" | "unconfirmed" | "invalid"
    error: str | None = None


class History:
    """Per-job execution history in a JetStream stream.

    Records go to `nats-cron.history.<stream>.<job subject>`; the stream name is part of
    the subject so that several deployments (or tests) on one server never overlap.
    """

    def __init__(self, nc: Client, stream: str, depth: int, replicas: int = 1) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.stream = stream
        self.depth = depth
        self.replicas = replicas
        self.prefix = f"{HISTORY_PREFIX}.{stream}"

    async def ensure(self) -> None:
        config = StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.>"],
            max_msgs_per_subject=self.depth,
            discard=DiscardPolicy.OLD,
            num_replicas=self.replicas,
            allow_direct=True,
        )
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await self._js.update_stream(config)

    async def append(self, subject: str, record: dict[str, Any]) -> None:
        # Fire-and-forget: history is informative and must not slow the fire path.
        await self._nc.publish(f"{self.prefix}.{subject}", json.dumps(record).encode())

    async def purge(self, subject: str) -> None:
        """Remove every record of `subject` (a job subject, or a NATS wildcard pattern of
        job subjects), so that a job created again under it starts with no history."""
        await self._js.purge_stream(self.stream, subject=f"{self.prefix}.{subject}")

    async def read(self, subject: str, limit: int) -> list[dict[str, Any]]:
        """The most recent `limit` records of `subject`, newest first."""
        filter_subject = f"{self.prefix}.{subject}"
        sub = await self._js.subscribe(filter_subject, stream=self.stream, ordered_consumer=True)
        records: list[dict[str, Any]] = []
        try:
            info = await sub.consumer_info()
            # Some messages may already sit in our queue: count delivered plus pending.
            delivered = info.delivered.consumer_seq if info.delivered else 0
            for _ in range((delivered or 0) + (info.num_pending or 0)):
                msg = await sub.next_msg(timeout=2)
                try:
                    records.append(json.loads(msg.data))
                except ValueError:
                    continue
        finally:
            await sub.unsubscribe()
        records.reverse()
        return records[:limit]


class Firer:
    """Publishes fires for one instance, behind the election's fence."""

    def __init__(
        self,
        nc: Client,
        instance_id: str,
        fence: Callable[[], bool],
        epoch: Callable[[], int],
        persist: Callable[[Job], None],
        history: History | None = None,
        on_fire: Callable[[str, str, float, bool], None] | None = None,
        leading_since: Callable[[], datetime | None] = lambda: None,
        confirm: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """`confirm` (a `Confirmer.confirm`) proves a publish reached the server before the
        fire counts: an unconfirmed fire hands its slot back instead of recording it."""
        self._nc = nc
        self._confirm = confirm
        self.instance_id = instance_id
        self._fence = fence
        self._epoch = epoch
        self._persist = persist
        self._history = history
        self._on_fire = on_fire
        self._leading_since = leading_since
        self._specs: dict[str, tuple[Any, JobSpec]] = {}
        self.in_flight = 0

    def spec_of(self, job: Job) -> JobSpec:
        """The job's validated document, parsed once per stored version."""
        doc = job.kwargs.get("job")
        cached = self._specs.get(job.id)
        if cached is not None and cached[0] is doc:
            return cached[1]
        # min_interval=0: the document passed the configured minimum when it was accepted.
        spec = parse_job(doc, min_interval=timedelta(0))
        if spec.subject != job.id:
            raise SpecError("target.subject", f"{spec.subject!r} does not match job id {job.id!r}")
        self._specs[job.id] = (doc, spec)
        return spec

    async def fire(
        self, job: Job, slot: datetime, history: list[tuple[str, dict[str, Any]]] | None = None
    ) -> FireOutcome:
        """Fire `job`'s `slot`. Its history record is appended to `history` if given (the
        caller then passes the list to `append_history`), else published at once."""
        self.in_flight += 1
        try:
            records: list[tuple[str, dict[str, Any]]] = [] if history is None else history
            outcome = await self._fire(job, slot, records)
            if history is None:
                await self.append_history(records)
            return outcome
        finally:
            self.in_flight -= 1

    async def append_history(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        if self._history is None:
            return
        for subject, record in records:
            try:
                await self._history.append(subject, record)
            except (nats.errors.Error, OSError) as exc:
                logger.bind(subject=subject).warning("history append failed: {}", exc)

    async def _fire(
        self, job: Job, slot: datetime, history: list[tuple[str, dict[str, Any]]]
    ) -> FireOutcome:
        try:
            spec = self.spec_of(job)
        except SpecError as exc:
            logger.bind(job_id=job.id).error("refusing to fire an invalid job document: {}", exc)
            return FireOutcome("invalid", str(exc))
        delay = jitter_delay(spec.subject, slot, spec.jitter)
        if delay:
            await asyncio.sleep(delay)
        if not self._fence():
            self._give_back(job, slot)
            logger.bind(subject=spec.subject).warning("fenced: not firing {}", rfc3339(slot))
            return FireOutcome("fenced")
        epoch = self._epoch()
        scheduled = rfc3339(slot)
        headers = {
            "Nats-Msg-Id": f"{spec.subject}:{slot_ms(slot)}",
            "Nats-Cron-Job": spec.subject,
            "Nats-Cron-Scheduled": scheduled,
            "Nats-Cron-Instance": self.instance_id,
            "Nats-Cron-Epoch": str(epoch),
        }
        actual = datetime.now(UTC)
        actual_text = rfc3339(actual)
        error: str | None = None
        status = "fired"
        try:
            await self._nc.publish(spec.subject, spec.payload(slot), headers=headers)
        except (nats.errors.Error, OSError) as exc:
            error, status = f"publish failed: {exc}", "error"
        if status == "fired" and self._confirm is not None and not await self._confirm():
            # The connection dropped (or stalled) before the server was seen to take the
            # publish: it may be lost. The next leader fires the slot again (same
            # Nats-Msg-Id, so a stream keeps one copy) rather than never.
            error, status = "publish not confirmed by the server (connection lost)", "unconfirmed"
            self._give_back(job, slot)
        else:
            self._record(job, scheduled, actual_text, error)
        lateness = (actual - slot).total_seconds()
        if self._on_fire is not None:
            since = self._leading_since()
            caught_up = since is not None and slot < since
            self._on_fire(spec.subject, status, lateness, caught_up)
        if self._history is not None:
            record = {
                "subject": spec.subject,
                "scheduled": scheduled,
                "actual": actual_text,
                "instance": self.instance_id,
                "epoch": epoch,
                "outcome": status,
                "error": error,
            }
            history.append((spec.subject, record))
        if error:
            logger.bind(subject=spec.subject, epoch=epoch, scheduled=scheduled).error(error)
            return FireOutcome(status, error)
        logger.debug("fired", subject=spec.subject, epoch=epoch, scheduled=scheduled)
        return FireOutcome("fired")

    def _record(self, job: Job, scheduled: str, actual: str, error: str | None) -> None:
        state = dict(job.kwargs.get("state") or {})
        state["last_scheduled"] = scheduled
        state["last_run"] = actual
        state["run_count"] = int(state.get("run_count") or 0) + (0 if error else 1)
        state["last_error"] = error
        job.kwargs = {**job.kwargs, "state": state}
        self._persist(job)

    def _give_back(self, job: Job, slot: datetime) -> None:
        """A fenced fire hands its slot back, so the next leader fires it (within grace)."""
        if job.next_run_time is not None and job.next_run_time > slot:
            job.next_run_time = slot
            self._persist(job)


class FireExecutor(BaseExecutor):  # type: ignore[misc]
    """APScheduler executor for nats-cron jobs, on the scheduler's asyncio loop."""

    def __init__(
        self,
        firer: Firer,
        on_missed: Callable[[str], None] | None = None,
        hold: Callable[[str], None] = lambda job_id: None,
        release: Callable[[str], None] = lambda job_id: None,
    ) -> None:
        """`hold`/`release` keep a job's state writes back while its fire is in flight
        (the job store's `hold()`/`release()`): the next run time APScheduler sets right
        after submitting must not be persisted before the publish, or a crash in between
        would lose the slot instead of leaving it to the next leader."""
        super().__init__()
        self._firer = firer
        self._on_missed = on_missed
        self._hold = hold
        self._release = release
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self._loop: asyncio.AbstractEventLoop = scheduler._eventloop

    def shutdown(self, wait: bool = True) -> None:
        # In-flight fires are awaited by `drain()`; nothing to do synchronously.
        pass

    async def drain(self, timeout: float) -> None:
        """Wait for in-flight fires (bounded)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        self._hold(job.id)  # before APScheduler's update_job of the advanced next run
        task = self._loop.create_task(self._run(job, run_times))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job: Job, run_times: list[datetime]) -> None:
        events: list[JobExecutionEvent] = []
        history: list[tuple[str, dict[str, Any]]] = []
        alias = job._jobstore_alias
        try:
            for run_time in run_times:
                late = datetime.now(UTC) - run_time
                if job.misfire_grace_time is not None and late > timedelta(
                    seconds=job.misfire_grace_time
                ):
                    events.append(JobExecutionEvent(EVENT_JOB_MISSED, job.id, alias, run_time))
                    if self._on_missed is not None:
                        self._on_missed(job.id)
                    logger.bind(job_id=job.id).warning(
                        "skipping slot {} (missed by {}, past its grace window)",
                        rfc3339(run_time),
                        late,
                    )
                    continue
                outcome = await self._firer.fire(job, run_time, history)
                code = EVENT_JOB_EXECUTED if outcome.status == "fired" else EVENT_JOB_ERROR
                events.append(JobExecutionEvent(code, job.id, alias, run_time, retval=outcome))
        except Exception as exc:
            logger.bind(job_id=job.id).exception("fire crashed: {}", exc)
            events.append(
                JobExecutionEvent(EVENT_JOB_ERROR, job.id, alias, run_times[-1], exception=exc)
            )
        finally:
            # Released first, so that the job's state write (queued now, sent by the store's
            # writer on the next loop turn) and the history records can share one socket
            # write (no CPU change measurable beyond the noise at 500-1,000 fires/s).
            self._release(job.id)
            self._run_job_success(job.id, events)
            await self._firer.append_history(history)
