"""The composition root: connection, store, election, scheduler, terms and API, wired.

`NatsCron` is also the embedding API: an asyncio application creates it with `Settings`
(and optionally its own NATS connection), `await start()`, manages jobs through
`.jobs` (a `JobManager`), and `await stop()` on the way out.

    cron = NatsCron(Settings(instance_id="app-1"), nc=my_connection)
    await cron.start()
    await cron.jobs.create({"target": {"subject": "app.tick"}, "schedule": {"every": "30s"}})
    ...
    await cron.stop()

Leadership, as the election adapter sees it: every instance runs a paused
`BatchScheduler` on the job store. On winning the lease, an instance catches its copy of
the jobs and of the run history up with KV, reads the last progress mark, claims it with
its epoch, builds a `Term` from it and resumes the scheduler; on losing the lease it
pauses at once and follows the history again. A clean stop stores a final mark before it
releases the lease, so the next leader starts where this one stopped.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from apscheduler.job import Job
from loguru import logger
from nats.aio.client import Client

from nats_apscheduler._wire import Wire
from nats_apscheduler.agenda import display_next
from nats_apscheduler.connection import connect
from nats_apscheduler.election import Election
from nats_apscheduler.errors import NatsCronError
from nats_apscheduler.fire import FIRE_REF, Firer, rfc3339
from nats_apscheduler.history import History, RunState, RunStates
from nats_apscheduler.jobs import JOBSTORE, JobManager, Limits
from nats_apscheduler.observe import HttpEndpoint, LoopMonitor, Metrics, State
from nats_apscheduler.progress import MarkTakenOver, Progress, Stored
from nats_apscheduler.scheduler import BatchScheduler
from nats_apscheduler.service import SERVICE_NAME, CronService
from nats_apscheduler.settings import Settings
from nats_apscheduler.store import JetStreamJobStore
from nats_apscheduler.term import Term

# Reconnect quickly (nats-py waits 2 s between tries to one server, which made recovery
# from a NATS restart take ~4 s), for the same ~2 minutes before giving up and exiting.
_RECONNECT_WAIT = 0.25
_RECONNECT_ATTEMPTS = 480
# A cluster that is still forming (every node's /healthz already 200, its meta layer not yet
# aware of every peer) refuses to place a replicated bucket ("no suitable peers for
# placement", 10005) or does not answer JetStream requests in time. Creating our buckets and
# stream is retried for this long.
_PROVISION_RETRY_S = 30.0
_PLACEMENT_ERRORS = (10005,)
_CLAIM_ATTEMPTS = 3


class NatsCron:
    """One nats-cron instance. See the module docstring."""

    def __init__(self, settings: Settings, nc: Client | None = None, version: str = "0.0.0"):
        self.settings = settings.validate()
        self.version = version
        self._nc = nc
        self._own_nc = nc is None
        self._fatal = asyncio.Event()
        self.fatal_reason: str | None = None
        self._stopped = False
        self._background: set[asyncio.Task[Any]] = set()
        self.started_at: datetime | None = None
        self._started_mono = 0.0
        self.term: Term | None = None
        self.store: JetStreamJobStore
        self.election: Election
        self.scheduler: BatchScheduler
        self.wire: Wire
        self.progress: Progress
        self.firer: Firer
        self.history: History
        self.states: RunStates
        self.jobs: JobManager
        self.service: CronService
        self.metrics: Metrics
        self.loop_monitor: LoopMonitor
        self.http: HttpEndpoint | None = None

    @property
    def nc(self) -> Client:
        assert self._nc is not None
        return self._nc

    async def start(self) -> None:
        s = self.settings
        log = logger.bind(instance_id=s.instance_id)
        if self._nc is None:
            # First connect without nats-py's reconnect loop, so that a wrong password
            # fails at once instead of after 60 retries; reconnects are wanted afterwards.
            self._nc = await connect(
                s.connection,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed,
                allow_reconnect=False,
            )
            self._nc.options["allow_reconnect"] = True
            self._nc.options["reconnect_time_wait"] = _RECONNECT_WAIT
            self._nc.options["max_reconnect_attempts"] = _RECONNECT_ATTEMPTS
        nc = self._nc
        self.wire = Wire(nc)
        self.store = JetStreamJobStore(
            bucket=s.jobs_bucket, replicas=s.replicas, nc=nc, functions=(FIRE_REF,)
        )
        self.store.on_failure = lambda exc: self._fail(f"job store failed: {exc}")
        await _provision(self.store.open, "the jobs bucket")
        self.history = History(nc, s.history_stream, s.history_depth, s.replicas)
        await _provision(self.history.ensure, "the history stream")
        self.states = RunStates(self.history)
        await self.states.follow(nc)
        self.election = Election(
            nc,
            s.leader_bucket,
            s.instance_id,
            s.lease_ttl.total_seconds(),
            replicas=s.replicas,
            on_won=self._on_won,
            on_lost=self._on_lost,
        )
        self.loop_monitor = LoopMonitor()
        self.metrics = Metrics(
            State(
                is_leader=self.election.is_leader_now,
                jobs=self.store.count,
                leader_changes=lambda: self.election.transitions,
                refresh_failures=lambda: self.election.refresh_failures,
                connected=lambda: nc.is_connected,
                ready=self._ready,
                loop_lag=lambda: self.loop_monitor.longest,
                loop_lag_recent=self.loop_monitor.recent,
                loop_lags=lambda: (self.loop_monitor.counts, self.loop_monitor.total),
            )
        )
        self.progress = Progress(nc, s.leader_bucket, self.wire)
        await self.progress.start()
        self.firer = Firer(
            self.wire,
            self.election,
            s.instance_id,
            self.history,
            self.states,
            observer=self.metrics,
        )
        self.scheduler = BatchScheduler(timezone=UTC)
        self.scheduler.add_jobstore(self.store, JOBSTORE)
        self.scheduler.start(paused=True)
        self.store.on_change = self._on_job_change
        self.jobs = JobManager(
            self.scheduler,
            self.store,
            Limits(min_interval=s.min_interval, max_payload=nc.max_payload, grace=s.grace),
            view=self,
            history=self.history,
        )
        self.service = CronService(
            nc,
            self.version,
            s.instance_id,
            self.jobs,
            self.status,
            self.history,
            on_request=self.metrics.on_request,
        )
        await self.service.start()
        self.loop_monitor.start()
        if s.metrics_port is not None:
            self.http = HttpEndpoint(self.metrics, s.metrics_host, s.metrics_port)
            await self.http.start()
        self.started_at = datetime.now(UTC)
        self._started_mono = time.monotonic()
        await _provision(self.election.start, "the leader bucket")
        log.bind(jobs=self.jobs.count(), bucket=s.jobs_bucket).info("nats-cron instance started")

    async def stop(self) -> None:
        """Stop firing, store the final progress mark, hand the lease over."""
        if self._stopped:
            return
        self._stopped = True
        log = logger.bind(instance_id=self.settings.instance_id)
        if hasattr(self, "scheduler") and self.scheduler.running:
            self.scheduler.pause()
        for task in self._background:  # a term that had not started firing yet
            task.cancel()
        term, self.term = self.term, None
        if term is not None:
            self.scheduler.term = None
            if not await term.finish(timeout=2.0):
                log.warning(
                    "stopping without a final progress mark: the next leader "
                    "fires the last slots again"
                )
        if hasattr(self, "store"):
            try:
                await asyncio.wait_for(self.store.aflush(), 5)
            except TimeoutError:
                log.warning("stopping with unwritten job changes")
        if hasattr(self, "election"):
            await self.election.stop(release=True)
        if hasattr(self, "service"):
            await self.service.stop()
        if hasattr(self, "progress"):
            await self.progress.stop()
        if hasattr(self, "states"):
            await self.states.pause()
        if hasattr(self, "loop_monitor"):
            self.loop_monitor.stop()
        if hasattr(self, "scheduler") and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self.http is not None:
            await self.http.stop()
        if hasattr(self, "store"):
            await self.store.aclose()
        if self._own_nc and self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.close()
            except (OSError, nats.errors.Error) as exc:
                log.debug("closing the connection: {}", exc)
        log.info("nats-cron instance stopped")

    async def wait_fatal(self) -> str:
        """Return when the instance cannot go on (connection closed for good)."""
        await self._fatal.wait()
        return self.fatal_reason or "fatal error"

    def _ready(self) -> bool:
        return not self._stopped and self.store.loaded and self.election.running

    def status(self) -> dict[str, Any]:
        leader = self.election.leader
        return {
            "service": SERVICE_NAME,
            "version": self.version,
            "instance_id": self.settings.instance_id,
            "is_leader": self.election.is_leader_now(),
            "leader": leader.to_dict() if leader else None,
            "jobs": self.jobs.count(),
            "skipped_records": len(self.store.skipped_records()),
            "started_at": rfc3339(self.started_at) if self.started_at else None,
            "uptime_seconds": round(time.monotonic() - self._started_mono, 3),
            "history_prefix": self.history.prefix,
        }

    # --- RunView (what `get` and `list` report besides the record) -------------------------------

    def next_run(self, job: Job, now: datetime) -> datetime | None:
        term = self.term
        if term is not None and job.next_run_time is not None:
            return term.next_slot(job.id, now)
        return display_next(job, now)

    def run_state(self, subject: str) -> RunState | None:
        return self.states.get(subject)

    # --- wiring callbacks ----------------------------------------------------------------------

    def _on_job_change(self, job_id: str, job: Job | None) -> None:
        if job is None:
            self.states.drop(job_id)
        term = self.term
        if term is not None and term.changed(job_id, job) and self.scheduler.running:
            self.scheduler.wakeup()

    def _on_won(self, epoch: int) -> None:
        task = asyncio.get_running_loop().create_task(self._lead(epoch))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lead(self, epoch: int) -> None:
        """Start a term: fire only from copies of the jobs and the history that hold what KV
        holds now (bounded by the lease TTL: past it, firing late beats not firing)."""
        ttl = self.settings.lease_ttl.total_seconds()
        log = logger.bind(instance_id=self.settings.instance_id, epoch=epoch)
        caught_up = await self.store.catch_up(timeout=ttl)
        history_caught_up = await self.states.catch_up(timeout=ttl)
        stored = await self._claim(epoch, ttl)
        if stored is None or self.election.epoch != epoch or not self.election.is_leader_now():
            if stored is None and self.election.epoch == epoch:
                self.election.step_down("could not read or claim the progress mark")
            return  # lost the lease meanwhile
        await self.states.pause()
        term = Term(
            epoch,
            self.settings.instance_id,
            self.store,
            self.firer,
            self.progress,
            self.election.is_leader_now,
            stored.mark,
            self.election.won_at or datetime.now(UTC),
            on_deposed=self.election.step_down,
        )
        self.term = term
        self.scheduler.term = term
        gc.freeze()  # the agenda's entries live as long as the term (see the job store)
        term.start()
        checks = (("job watch", caught_up), ("history", history_caught_up))
        behind = [what for what, ok in checks if not ok]
        if stored.mark is not None:
            log = log.bind(handled=rfc3339(stored.mark.handled))
        log.info(f"leading: firing ({', '.join(behind)} behind)" if behind else "leading: firing")
        if self.scheduler.running:
            self.scheduler.resume()

    async def _claim(self, epoch: int, timeout: float) -> Stored | None:
        """Read the progress mark and write it back with our epoch, so that a deposed
        leader's late mark can no longer land; None if that failed."""
        for _ in range(_CLAIM_ATTEMPTS):
            try:
                stored = await asyncio.wait_for(self.progress.read(), timeout)
            except (nats.errors.Error, TimeoutError) as exc:
                logger.warning(
                    "reading the progress mark failed: {}", str(exc) or type(exc).__name__
                )
                return None
            self.progress.revision = stored.revision
            if stored.mark is None:
                return stored
            try:
                if await self.progress.write(
                    stored.mark, epoch, self.settings.instance_id, self.election.is_leader_now
                ):
                    return stored
                return None
            except MarkTakenOver:
                continue  # a late write of the previous leader: read it again
        return None

    def _on_lost(self, reason: str) -> None:
        log = logger.bind(instance_id=self.settings.instance_id)
        if reason == "released":
            log.info("following: released the lease")
        else:
            log.warning("following: {}", reason)
        if self.scheduler.running:
            self.scheduler.pause()
        term, self.term = self.term, None
        self.scheduler.term = None
        if term is not None:
            unconfirmed = term.stop()
            if unconfirmed:
                self.metrics.on_unconfirmed(unconfirmed)
                log.bind(epoch=term.epoch).warning(
                    "{} fire(s) since the last progress mark are not confirmed: the next "
                    "leader fires those slots again",
                    unconfirmed,
                )
        if not self._stopped:
            task = asyncio.get_running_loop().create_task(self.states.follow(self.nc))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _on_disconnected(self) -> None:
        if self._stopped:
            return
        logger.bind(instance_id=self.settings.instance_id).warning("NATS connection lost")
        if hasattr(self, "wire"):
            self.wire.connection_lost()
        if hasattr(self, "election"):
            self.election.connection_lost()

    async def _on_reconnected(self) -> None:
        logger.bind(instance_id=self.settings.instance_id).info("NATS connection restored")
        if hasattr(self, "election"):
            self.election.connection_restored()

    async def _on_closed(self) -> None:
        self._fail("NATS connection closed for good")

    def _fail(self, reason: str) -> None:
        if not self._stopped and not self._fatal.is_set():
            self.fatal_reason = reason
            self._fatal.set()

    async def _on_error(self, exc: Exception) -> None:
        logger.bind(instance_id=self.settings.instance_id).warning(
            "NATS error: {}", str(exc) or type(exc).__name__
        )


__all__ = ["NatsCron", "NatsCronError"]


async def _provision(create: Callable[[], Awaitable[None]], what: str) -> None:
    """`await create()`, retried while a forming cluster cannot place replicas or answer in
    time yet (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _PROVISION_RETRY_S
    while True:
        try:
            await create()
            return
        except nats.js.errors.APIError as exc:
            if exc.err_code not in _PLACEMENT_ERRORS or loop.time() >= deadline:
                raise
            logger.warning("cannot create {} yet (retrying): {}", what, exc.description)
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            if loop.time() >= deadline:
                raise
            logger.warning("cannot create {} yet (retrying): {}", what, str(exc) or "timeout")
        await asyncio.sleep(0.5)
