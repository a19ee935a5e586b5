"""The composition root: connection, store, election, scheduler, firer and API, wired.

`NatsCron` is also the embedding API: an asyncio application creates it with `Settings`
(and optionally its own NATS connection), `await start()`, manages jobs through
`.jobs` (a `JobManager`), and `await stop()` on the way out.

    cron = NatsCron(Settings(instance_id="app-1"), nc=my_connection)
    await cron.start()
    await cron.jobs.create({"target": {"subject": "app.tick"}, "schedule": {"every": "30s"}})
    ...
    await cron.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_RUNNING
from loguru import logger
from nats.aio.client import Client

from nats_apscheduler.confirm import Confirmer
from nats_apscheduler.connection import connect
from nats_apscheduler.election import Election
from nats_apscheduler.errors import NatsCronError
from nats_apscheduler.fire import FIRE_REF, FireExecutor, Firer, History, rfc3339
from nats_apscheduler.jobs import EXECUTOR, JOBSTORE, JobManager, Limits
from nats_apscheduler.observe import HttpEndpoint, Metrics, State
from nats_apscheduler.service import SERVICE_NAME, CronService
from nats_apscheduler.settings import Settings
from nats_apscheduler.store import JetStreamJobStore

# While the fence is down, a running scheduler re-checks this often (seconds) instead of
# firing; the election pauses it properly within the same turn of the loop anyway.
_FENCED_RETRY = 0.1
# Reconnect quickly (nats-py waits 2 s between tries to one server, which made recovery
# from a NATS restart take ~4 s), for the same ~2 minutes before giving up and exiting.
_RECONNECT_WAIT = 0.25
_RECONNECT_ATTEMPTS = 480
# A cluster that is still forming (every node's /healthz already 200, its meta layer not yet
# aware of every peer) refuses to place a replicated bucket: "no suitable peers for
# placement" (10005). Creating our buckets and stream is retried for this long.
_PLACEMENT_RETRY_S = 30.0
_PLACEMENT_ERRORS = (10005,)


class FencedScheduler(AsyncIOScheduler):  # type: ignore[misc]
    """An AsyncIOScheduler that processes due jobs only while the fence holds.

    Processing a job advances its next run time; doing that without the lease could
    consume a slot that the real leader then never fires.
    """

    def __init__(self, fence: Any, **options: Any) -> None:
        super().__init__(**options)
        self._fence = fence

    def _process_jobs(self) -> float | None:
        if self.state == STATE_RUNNING and not self._fence():
            return _FENCED_RETRY
        result: float | None = super()._process_jobs()
        return result


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
        self._background: set[asyncio.Task[None]] = set()
        self.started_at: datetime | None = None
        self._started_mono = 0.0
        self.store: JetStreamJobStore
        self.election: Election
        self.scheduler: FencedScheduler
        self.confirmer: Confirmer
        self.firer: Firer
        self.executor: FireExecutor
        self.history: History
        self.jobs: JobManager
        self.service: CronService
        self.metrics: Metrics
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
        self.store = JetStreamJobStore(
            bucket=s.jobs_bucket, replicas=s.replicas, nc=nc, functions=(FIRE_REF,)
        )
        self.store.on_failure = lambda exc: self._fail(f"job store failed: {exc}")
        await _provision(self.store.open, "the jobs bucket")
        self.history = History(nc, s.history_stream, s.history_depth, s.replicas)
        await _provision(self.history.ensure, "the history stream")
        self.election = Election(
            nc,
            s.leader_bucket,
            s.instance_id,
            s.lease_ttl.total_seconds(),
            replicas=s.replicas,
            on_won=self._on_won,
            on_lost=self._on_lost,
        )
        self.metrics = Metrics(
            State(
                is_leader=self.election.is_leader_now,
                jobs=lambda: len(self.store.get_all_jobs()),
                leader_changes=lambda: self.election.transitions,
                refresh_failures=lambda: self.election.refresh_failures,
                connected=lambda: nc.is_connected,
                ready=self._ready,
            )
        )
        self.confirmer = Confirmer(nc)
        await self.confirmer.start()
        self.firer = Firer(
            nc,
            s.instance_id,
            fence=self.election.is_leader_now,
            epoch=lambda: self.election.epoch,
            persist=self._persist,
            history=self.history,
            on_fire=self.metrics.on_fire,
            leading_since=lambda: self.election.won_at,
            confirm=self.confirmer.confirm,
        )
        self.executor = FireExecutor(
            self.firer,
            on_missed=self.metrics.on_missed,
            hold=self.store.hold,
            release=self.store.release,
        )
        self.scheduler = FencedScheduler(self.election.is_leader_now, timezone=UTC)
        self.scheduler.add_jobstore(self.store, JOBSTORE)
        self.scheduler.add_executor(self.executor, EXECUTOR)
        self.scheduler.start(paused=True)
        self.jobs = JobManager(
            self.scheduler,
            self.store,
            Limits(min_interval=s.min_interval, max_payload=nc.max_payload, grace=s.grace),
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
        if s.metrics_port is not None:
            self.http = HttpEndpoint(self.metrics, s.metrics_host, s.metrics_port)
            await self.http.start()
        self.started_at = datetime.now(UTC)
        self._started_mono = time.monotonic()
        await _provision(self.election.start, "the leader bucket")
        log.bind(jobs=self.jobs.count(), bucket=s.jobs_bucket).info("nats-cron instance started")

    async def stop(self) -> None:
        """Stop firing, finish in-flight fires, persist run state, hand the lease over."""
        if self._stopped:
            return
        self._stopped = True
        log = logger.bind(instance_id=self.settings.instance_id)
        if hasattr(self, "scheduler") and self.scheduler.running:
            self.scheduler.pause()
        for task in self._background:  # a term that had not started firing yet
            task.cancel()
        if hasattr(self, "executor"):
            await self.executor.drain(timeout=5)
        if hasattr(self, "store"):
            try:
                await asyncio.wait_for(self.store.aflush(), 5)
            except TimeoutError:
                log.warning("stopping with unwritten job changes")
        if hasattr(self, "election"):
            await self.election.stop(release=True)
        if hasattr(self, "service"):
            await self.service.stop()
        if hasattr(self, "confirmer"):
            await self.confirmer.stop()
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
        }

    # --- wiring callbacks ----------------------------------------------------------------------

    def _persist(self, job: Any) -> None:
        with contextlib.suppress(LookupError):  # deleted meanwhile: nothing to record
            self.store.update_job(job)

    def _on_won(self, epoch: int) -> None:
        task = asyncio.get_running_loop().create_task(self._lead(epoch))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lead(self, epoch: int) -> None:
        # Fire only from an index that holds everything in KV now: a watch left behind
        # by a server restart would make us fire slots the previous leader already fired.
        # Bounded by the lease TTL: past it, firing late beats not firing.
        caught_up = await self.store.catch_up(timeout=self.settings.lease_ttl.total_seconds())
        log = logger.bind(instance_id=self.settings.instance_id, epoch=epoch)
        if self.election.epoch != epoch or not self.election.is_leader_now():
            return  # lost the lease meanwhile
        log.info("leading: firing" if caught_up else "leading: firing (job watch behind)")
        if self.scheduler.running:
            self.scheduler.resume()

    def _on_lost(self, reason: str) -> None:
        logger.bind(instance_id=self.settings.instance_id).warning("following: {}", reason)
        if self.scheduler.running:
            self.scheduler.pause()

    async def _on_disconnected(self) -> None:
        if self._stopped:
            return
        logger.bind(instance_id=self.settings.instance_id).warning("NATS connection lost")
        if hasattr(self, "election"):
            self.election.connection_lost()
        if hasattr(self, "confirmer"):
            self.confirmer.connection_lost()

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
        logger.bind(instance_id=self.settings.instance_id).warning("NATS error: {}", exc)


__all__ = ["FencedScheduler", "NatsCron", "NatsCronError"]


async def _provision(create: Callable[[], Awaitable[None]], what: str) -> None:
    """`await create()`, retried while the cluster cannot place replicas yet (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _PLACEMENT_RETRY_S
    while True:
        try:
            await create()
            return
        except nats.js.errors.APIError as exc:
            if exc.err_code not in _PLACEMENT_ERRORS or loop.time() >= deadline:
                raise
            logger.warning("cannot create {} yet (retrying): {}", what, exc.description)
            await asyncio.sleep(0.5)
