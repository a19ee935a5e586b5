"""`Term`: what a leader does while it holds the lease: work through due jobs in bounded
slices, write each slice's fires at once, and keep the progress mark moving.

A slice takes at most `slice_jobs` due jobs or `slice_seconds` of the loop, whichever comes
first, then yields (the scheduler calls again on the next turn of the loop): a herd of
100,000 jobs on one slot never blocks the lease refresh or the API for long, and its fires
leave slice by slice while the rest is still being worked through.

When a slice has worked through everything due at its `now`, the term has handled every
slot up to `now` of every job in its copy of the bucket as of the jobs stream's sequence
read at the slice's start: that is the next progress mark. A task writes the newest mark
every `mark_interval` seconds (see `progress`); a stored mark also confirms the fires
before it, and only then are one-shot jobs that fired (and jobs past their `end`) deleted.

Jobs whose fires await a reply (`request`, `jetstream`) are bounded by the instance's
in-flight limit: a due slot of such a job that finds no room waits, unresolved, in a queue
outside the agenda (looked at every `DEFER` seconds, first come first served, without
touching the agenda's heap meanwhile), and the progress mark stays below its due time until
it is sent, so a crash never loses it; publish-mode jobs fire on regardless. A request job with
`overlap: skip` whose previous run is still going (in flight, or waiting for a retry) has
its slot recorded as `skipped`. The term also sends the next attempts of failed runs
(`retry.Retries`) when they are due.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from apscheduler.job import Job
from loguru import logger

from nats_apscheduler._tasks import cancel_and_wait
from nats_apscheduler.agenda import Agenda, Entry, Mark, resolve
from nats_apscheduler.errors import MarkTakenOver, SpecError
from nats_apscheduler.fire import Fire, FirePlan, Firer, Plans, Skip, rfc3339
from nats_apscheduler.progress import Progress
from nats_apscheduler.retry import Pending, Retries
from nats_apscheduler.shards import shard_of

SLICE_JOBS = 2000
SLICE_SECONDS = 0.005
MARK_INTERVAL = 0.2
FENCED_RETRY = 0.1  # while fenced, the scheduler looks again this often (seconds)
DEFER = 0.05  # a fire awaiting room in flight is tried again this often (seconds)
_US = timedelta(microseconds=1)
_CHECK_EVERY = 64  # jobs between looks at the slice's clock


class JobSource(Protocol):
    """What a term needs of the job store (a `JetStreamJobStore` is one)."""

    def records(self) -> list[tuple[str, Any, Job | None]]: ...

    def revision(self, job_id: str) -> int: ...

    @property
    def applied_seq(self) -> int: ...

    def lookup_job(self, job_id: str) -> Job | None: ...

    def remove_job(self, job_id: str) -> None: ...


class Term:
    def __init__(
        self,
        epoch: int,
        instance_id: str,
        store: JobSource,
        firer: Firer,
        progress: Progress,
        fence: Callable[[], bool],
        mark: Mark | None,
        leading_since: datetime,
        on_deposed: Callable[[str], None] = lambda reason: None,
        slice_jobs: int = SLICE_JOBS,
        slice_seconds: float = SLICE_SECONDS,
        mark_interval: float = MARK_INTERVAL,
        shard: int = 0,
        shards: int = 1,
        retries: Retries | None = None,
    ) -> None:
        """A term of shard `shard` of `shards`: its agenda holds that shard's jobs only."""
        self.epoch = epoch
        self.instance_id = instance_id
        self._store = store
        self._firer = firer
        self._progress = progress
        self._fence = fence
        self._on_deposed = on_deposed
        self._since = leading_since
        self._slice_jobs = slice_jobs
        self._slice_seconds = slice_seconds
        self._mark_interval = mark_interval
        self.plans = Plans()
        self.agenda = Agenda(delay=self.plans.delay)
        self.shard = shard
        records = store.records()
        if shards > 1:
            records = [r for r in records if shard_of(r[0], shards) == shard]
        self.agenda.build(records, mark, store.revision)
        self.processed: Mark | None = mark  #: newest (handled, applied) reached
        self.stored: Mark | None = mark  #: newest mark known to be in KV
        self._finished: list[tuple[datetime, Job]] = []  # jobs with no slot left
        self._unconfirmed = 0  # fires written since the last stored mark was sent
        self._dirty = asyncio.Event()
        self._marker: asyncio.Task[None] | None = None
        self._closed = False
        self.slices = 0
        self.longest_slice = 0.0  #: seconds, the longest the loop was held by one slice
        self._retries = retries
        # Entries waiting for room in flight (in order), with their due times by job id.
        self._waiting: collections.deque[Entry] = collections.deque()
        self._held: dict[str, tuple[Entry, float]] = {}
        self._room = 0  # room in flight left in the current slice
        self.deferred = 0  #: due slots put back for lack of room in flight
        firer.epoch = epoch

    # --- the scheduler's side --------------------------------------------------------------------

    def start(self) -> None:
        self._marker = asyncio.get_running_loop().create_task(
            self._mark_loop(), name=f"progress-marks-{self.epoch}"
        )
        retries = self._retries
        if retries is not None:
            for pending in retries.pending():  # continued from the previous leader
                self._firer.running[pending.subject] += 1
            retries.on_due = self._retry_due
            retries.start()

    def process(self) -> float | None:
        """One slice; returns seconds until the scheduler should call again (None: idle)."""
        if self._closed:
            return None
        if not self._fence():
            return FENCED_RETRY
        began = time.perf_counter()
        now = datetime.now(UTC)
        now_ts = now.timestamp()
        applied = self._store.applied_seq
        fires: list[Fire] = []
        skips: list[Skip] = []
        finished: list[Job] = []
        drained = False
        budget = self._slice_jobs
        deadline = began + self._slice_seconds
        self._room = room = self._firer.room()
        if self._waiting and room > 0:
            self._release(now_ts, room)
        while True:
            want = min(_CHECK_EVERY, budget)
            batch = self.agenda.pop_due(now_ts, want)
            for entry in batch:
                self._work(entry, now, fires, skips, finished)
            budget -= len(batch)
            if len(batch) < want:
                drained = True  # nothing else is due at `now`
                break
            if budget <= 0 or time.perf_counter() > deadline:
                break
        if fires or skips:
            if not self._firer.write(fires, skips):
                # Fenced (or disconnected) at the last moment: nothing went out, and this
                # term never marks progress again, so the next term fires these slots.
                self._closed = True
                self._on_deposed("fenced while writing fires")
                return None
            self._unconfirmed += len(fires)
        self._finished.extend((now, job) for job in finished)
        if drained:
            self.processed = Mark(self._handled(now), applied)
            self._dirty.set()
        held = time.perf_counter() - began
        self.slices += 1
        if held > self.longest_slice:
            self.longest_slice = held
        if not drained:
            return 0.0
        at = self.agenda.next_at()
        wait = None if at is None else max(0.0, at - time.time())
        if self._waiting and (wait is None or wait > DEFER):
            return DEFER  # look for room again
        return wait

    def _work(
        self,
        entry: Entry,
        now: datetime,
        fires: list[Fire],
        skips: list[Skip],
        finished: list[Job],
    ) -> None:
        job = entry.job
        if job is None:
            job = entry.job = self._store.lookup_job(entry.job_id)  # decoded when due
            if job is None:  # unreadable (skipped, and logged) or gone
                self.agenda.advance(entry, None)
                return
            if entry.floor is None and self.plans.delay(job, entry.slot):
                # Built without its jitter delay: due at the slot plus its delay.
                self.agenda.advance(entry, entry.slot)
                return
        try:
            plan = self.plans.of(job)
        except SpecError as exc:
            logger.bind(job_id=job.id).error("refusing to fire an invalid job document: {}", exc)
            self.agenda.advance(entry, None)
            return
        if plan.delivery.mode != "publish":
            if self._room <= 0:
                # No room in flight: not resolved, so not handled; the mark stays below it.
                held = self._held.get(entry.job_id)
                if held is None or held[0] is not entry:  # (a replaced entry no longer holds)
                    self._held[entry.job_id] = (entry, self._due(entry))
                self._waiting.append(entry)
                self.deferred += 1
                return
            self._held.pop(entry.job_id, None)
        grace = job.misfire_grace_time
        if _forced_run(job):
            # A paused job triggered with force: its record's one slot, then nothing more.
            pending = entry.floor is None or entry.slot > entry.floor
            if pending and (grace is None or (now - entry.slot).total_seconds() <= grace):
                self._fire(plan, entry.slot, entry.slot < self._since, fires, skips)
            self.agenda.advance(entry, None)
            return
        slots = resolve(
            job.trigger,
            entry.slot,
            now,
            None if grace is None else timedelta(seconds=grace),
            entry.floor,
            plan.delay if plan.jitter else None,
            plan.jitter,
        )
        if slots.skipped:
            assert slots.first_skipped is not None and slots.last_skipped is not None
            skips.append(
                Skip(
                    plan.subject,
                    slots.skipped,
                    slots.first_skipped,
                    slots.last_skipped,
                    slots.more_skipped,
                    past_grace=slots.fire is None,
                )
            )
        if slots.fire is not None:
            caught_up = slots.skipped > 0 or slots.fire < self._since
            self._fire(plan, slots.fire, caught_up, fires, skips)
        self.agenda.advance(entry, slots.following)
        if slots.following is None:
            finished.append(job)

    def _fire(
        self, plan: FirePlan, slot: datetime, caught_up: bool, fires: list[Fire], skips: list[Skip]
    ) -> None:
        """Fire `slot`, or record it as skipped (overlap: skip, the previous run going)."""
        delivery = plan.delivery
        if delivery.mode != "publish":
            if delivery.overlap == "skip" and self._firer.running[plan.subject]:
                skips.append(Skip(plan.subject, 1, slot, slot, False, False, kind="skipped"))
                return
            self._room -= 1
        fires.append(Fire(plan, slot, caught_up))

    def _release(self, now_ts: float, room: int) -> None:
        """Entries that waited for room go back on the agenda, due now, as room allows."""
        waiting = self._waiting
        while waiting and room > 0:
            entry = waiting.popleft()
            if self.agenda.holds(entry):  # not replaced by a change of its job meanwhile
                self.agenda.defer(entry, now_ts)
                room -= 1

    @staticmethod
    def _due(entry: Entry) -> float:
        """When a popped entry's first unhandled slot was due (with a floor: nothing up to
        the floor is unhandled)."""
        if entry.floor is not None and entry.slot <= entry.floor:
            return max(entry.at, entry.floor.timestamp())
        return entry.at

    def _handled(self, now: datetime) -> datetime:
        """The next mark: `now`, or just before the earliest slot put back for lack of room
        (never below the mark already reached)."""
        handled = now
        if self._held:
            for job_id, (entry, due) in list(self._held.items()):
                if not self.agenda.holds(entry):  # the job changed or went: not held back
                    del self._held[job_id]
                    continue
                moment = datetime.fromtimestamp(due, UTC) - _US
                if moment < handled:
                    handled = moment
        if self.processed is not None and handled < self.processed.handled:
            return self.processed.handled
        return handled

    # --- retries -------------------------------------------------------------------------------

    def _retry_due(self, due: list[Pending]) -> None:
        """Send the next attempts of failed runs that are due (called by `Retries`)."""
        retries = self._retries
        if self._closed or retries is None:
            return
        if not self._fence():
            for pending in due:
                retries.defer(pending, FENCED_RETRY)
            return
        room = self._firer.room()
        fires: list[Fire] = []
        sent: list[Pending] = []
        for pending in due:
            job = self._store.lookup_job(pending.subject)
            plan = None
            if job is not None:
                try:
                    plan = self.plans.of(job)
                except SpecError:
                    plan = None
            if plan is None:  # the job was deleted (or can no longer be read): no more tries
                retries.done(pending.subject, pending.slot)
                self._firer.forget(pending.subject)
                continue
            if plan.delivery.tracked:
                if room <= 0:
                    retries.defer(pending, DEFER)
                    continue
                room -= 1
            fires.append(Fire(plan, pending.slot, pending.caught_up, pending.attempt))
            sent.append(pending)
        if not fires:
            return
        if not self._firer.write(fires):
            self._closed = True
            self._on_deposed("fenced while writing retries")
            return
        for item, pending in zip(fires, sent, strict=True):
            if not item.plan.delivery.tracked:  # now a publish: no outcome to wait for
                retries.done(pending.subject, pending.slot)
                self._firer.forget(pending.subject)
        logger.bind(epoch=self.epoch).debug("sent {} retry attempt(s)", len(fires))

    def changed(self, job_id: str, job: Job | None) -> bool:
        """A job's record changed (locally or in KV): True if its due time moved."""
        if job is None:
            self.plans.forget(job_id)
        return self.agenda.changed(job_id, job)

    def next_slot(self, job_id: str, now: datetime) -> datetime | None:
        return self.agenda.next_slot(job_id, now)

    # --- progress marks --------------------------------------------------------------------------

    async def _mark_loop(self) -> None:
        while not self._closed:
            if not self._dirty.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), self._mark_interval)
                if not self._dirty.is_set():
                    self._follow_applied()
                    continue
            self._dirty.clear()
            with contextlib.suppress(MarkTakenOver):
                if await self._write_mark():
                    await asyncio.sleep(self._mark_interval)
                    continue
            if self._closed:
                return
            await asyncio.sleep(self._mark_interval)
            self._dirty.set()  # not stored: try again

    def _follow_applied(self) -> None:
        """While nothing is due, move the mark up to the newest record applied. A record
        this term acted on may come back from the bucket after the slice that handled it
        (its own write's revision: a trigger, a forced run); a mark that names an older
        revision would have the next leader start that record from its own origin and
        fire its slot again."""
        if self._closed:
            return
        applied = self._store.applied_seq
        if self.processed is not None and applied <= self.processed.applied:
            return
        at = self.agenda.next_at()
        if (at is not None and at <= time.time()) or not self._fence():
            return  # a slice is due (it marks), or this term may no longer speak
        self.processed = Mark(self._handled(datetime.now(UTC)), applied)
        self._dirty.set()

    async def _write_mark(self) -> bool:
        mark = self.processed
        if mark is None or (self.stored is not None and mark == self.stored):
            return True
        sent_unconfirmed = self._unconfirmed
        try:
            ok = await self._progress.write(mark, self.epoch, self.instance_id, self._fence)
        except MarkTakenOver as exc:
            logger.bind(epoch=self.epoch).warning("another leader wrote the progress mark: {}", exc)
            self._closed = True
            self._on_deposed("the progress mark was taken over")
            raise
        if not ok:
            return False
        self.stored = mark
        self._unconfirmed -= sent_unconfirmed
        self._remove_finished(mark.handled)
        return True

    def _remove_finished(self, handled: datetime) -> None:
        """Delete the jobs that have no slot left once a stored mark covers their last fire."""
        keep: list[tuple[datetime, Job]] = []
        for when, job in self._finished:
            if when > handled:
                keep.append((when, job))
                continue
            job_id: str = job.id
            if self._store.lookup_job(job_id) is job:  # not changed meanwhile
                with contextlib.suppress(LookupError):
                    self._store.remove_job(job_id)
        self._finished = keep

    async def finish(self, timeout: float) -> bool:
        """A clean end of the term (the lease is about to be released): store the newest
        mark and the retry records, so the next leader starts exactly where this one
        stopped."""
        self._closed = True
        self._firer.closed = True
        if self._retries is not None:
            await self._retries.flush(timeout / 2)
            await self._retries.stop()
        await cancel_and_wait([self._marker])  # a plain cancel can be lost (see _tasks)
        try:
            ok = await asyncio.wait_for(self._write_mark(), timeout)
        except (TimeoutError, MarkTakenOver):
            ok = False
        if ok and self.stored is not None:
            logger.bind(epoch=self.epoch).debug(
                "final progress mark: handled up to {}", rfc3339(self.stored.handled)
            )
        return ok

    def stop(self) -> int:
        """The term ended without a clean release; returns the fires not known to have
        reached the server (the next leader fires them again)."""
        self._closed = True
        self._firer.closed = True
        if self._marker is not None:
            self._marker.cancel()
        if self._retries is not None:
            self._retries.halt()
        return max(0, self._unconfirmed)


def _forced_run(job: Job) -> bool:
    """A job whose document says paused but whose record has a next run time: a run
    forced by `trigger --force`, the only slot it fires."""
    document = job.kwargs.get("job")
    return isinstance(document, dict) and bool(document.get("paused"))
