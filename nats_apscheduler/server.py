"""The composition root: connection, store, election, scheduler, terms and API, wired.

`NatsCron` is also the embedding API: an asyncio application creates it with `Settings`
(and optionally its own NATS connection), `await start()`, manages jobs through
`.jobs` (a `JobManager`), and `await stop()` on the way out.

    cron = NatsCron(Settings(instance_id="app-1"), nc=my_connection)
    await cron.start()
    await cron.jobs.create({"target": {"subject": "app.tick"}, "schedule": {"every": "30s"}})
    ...
    await cron.stop()

Every instance runs a `BatchScheduler` on the job store; `Leadership` (the election adapter)
hands it a `Term` for each shard whose lease this instance wins and takes it back when the
lease is lost. A clean stop stores each term's final progress mark before it releases the
leases, so the next leaders start where this one stopped.
"""

from __future__ import annotations

import asyncio
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
from nats_apscheduler.client import CronClient
from nats_apscheduler.connection import connect
from nats_apscheduler.delivery import Deliveries
from nats_apscheduler.election import Election
from nats_apscheduler.errors import NatsCronError
from nats_apscheduler.fire import FIRE_REF, rfc3339
from nats_apscheduler.history import History, RunState, RunStates
from nats_apscheduler.jobs import JOBSTORE, JobManager, Limits
from nats_apscheduler.leadership import Leadership
from nats_apscheduler.observe import LoopMonitor, Metrics, State
from nats_apscheduler.scheduler import BatchScheduler
from nats_apscheduler.service import SERVICE_NAME, CronService
from nats_apscheduler.settings import Settings
from nats_apscheduler.store import JetStreamJobStore
from nats_apscheduler.term import Term
from nats_apscheduler.web import HttpListener
from nats_apscheduler.webapi import PREVIEW_PATH, WebApi

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
        self.store: JetStreamJobStore
        self.leadership: Leadership
        self.scheduler: BatchScheduler
        self.wire: Wire
        self.deliveries: Deliveries
        self.history: History
        self.states: RunStates
        self.jobs: JobManager
        self.service: CronService
        self.metrics: Metrics
        self.loop_monitor: LoopMonitor
        self.http: HttpListener | None = None

    @property
    def nc(self) -> Client:
        assert self._nc is not None
        return self._nc

    @property
    def election(self) -> Election:
        """The lease of shard 0 (the only one of a deployment without shards)."""
        return self.leadership.elections[0]

    @property
    def term(self) -> Term | None:
        """This instance's term of shard 0, while it leads that shard."""
        return self.leadership.terms.get(0)

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
        self.history = History(
            nc, s.events_stream, s.events_depth, s.replicas, prefix=s.events_prefix
        )
        await _provision(self.history.ensure, "the events stream")
        self.deliveries = Deliveries(nc, s.max_in_flight)
        await self.deliveries.start()
        self.states = RunStates(self.history)
        if s.shards == 1:
            await self.states.follow(nc)  # the standby's copy of the leader's run state
        # With shards, other leaders' run state is read when asked (`refresh`) and when a
        # shard is won (`load`): following every record on every instance cost each one
        # about a third of its CPU per fire, and the server as much again.
        self.scheduler = BatchScheduler(timezone=UTC)
        self.loop_monitor = LoopMonitor()
        self.metrics = Metrics(
            State(
                is_leader=lambda: self.leadership.is_leading(),
                jobs=self.store.count,
                leader_changes=lambda: self.leadership.transitions,
                refresh_failures=lambda: self.leadership.refresh_failures,
                connected=lambda: nc.is_connected,
                ready=self._ready,
                loop_lag=lambda: self.loop_monitor.longest,
                loop_lag_recent=self.loop_monitor.recent,
                loop_lags=lambda: (self.loop_monitor.counts, self.loop_monitor.total),
                shards_held=lambda: len(self.leadership.held()),
                handovers=lambda: self.leadership.handovers,
                unconfirmed=lambda: self.leadership.unconfirmed,
                in_flight=lambda: self.deliveries.in_flight,
                in_flight_limit=lambda: self.deliveries.limit,
            ),
            per_subject=s.metrics_subjects,
        )
        self.leadership = Leadership(
            nc,
            s.leader_bucket,
            s.instance_id,
            s.lease_ttl.total_seconds(),
            s.shards,
            s.replicas,
            self.store,
            self.scheduler,
            self.states,
            self.history,
            self.wire,
            self.metrics,
            catch_up=self.store.catch_up,
            deliveries=self.deliveries,
        )
        if s.shards > 1:
            # Other shards' leaders write their run state: follow it, but not our own.
            self.states.ignore = self.leadership.owns
        self.scheduler.add_jobstore(self.store, JOBSTORE)
        self.scheduler.start()  # idle until Leadership hands it a term
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
        if s.listen_port is not None:
            api = WebApi(self.jobs, self.service, self.metrics, CronClient(nc).discover)
            self.http = HttpListener(
                self.metrics,
                s.listen_host,
                s.listen_port,
                token=s.http_token,
                routes=api.routes(),
                open_posts=[PREVIEW_PATH],
            )
            await self.http.start()
        self.started_at = datetime.now(UTC)
        self._started_mono = time.monotonic()
        await _provision(self.leadership.start, "the leader bucket")
        log.bind(jobs=self.jobs.count(), bucket=s.jobs_bucket, shards=s.shards).info(
            "nats-cron instance started"
        )

    async def stop(self) -> None:
        """Stop firing, store the final progress marks, hand the leases over."""
        if self._stopped:
            return
        self._stopped = True
        log = logger.bind(instance_id=self.settings.instance_id)
        for task in self._background:
            task.cancel()
        if hasattr(self, "leadership"):
            await self.leadership.stop()
        if hasattr(self, "store"):
            try:
                await asyncio.wait_for(self.store.aflush(), 5)
            except TimeoutError:
                log.warning("stopping with unwritten job changes")
        if hasattr(self, "service"):
            await self.service.stop()
        if hasattr(self, "deliveries"):
            dropped = await self.deliveries.stop()
            if dropped:
                log.warning(
                    "stopping with {} request(s) in flight: their outcomes are not recorded",
                    dropped,
                )
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
        return not self._stopped and self.store.loaded and self.leadership.running

    def status(self) -> dict[str, Any]:
        shards = self.settings.shards
        leader = self.election.leader if shards == 1 else None
        extra: dict[str, Any] = {}
        if shards > 1:
            extra = {
                "shards": self.leadership.shard_table(),
                "shards_held": self.leadership.held(),
                "instances_live": self.leadership.members.count(),
            }
        return {
            "service": SERVICE_NAME,
            "version": self.version,
            "instance_id": self.settings.instance_id,
            "is_leader": self.leadership.is_leading(),
            "leader": leader.to_dict() if leader else None,
            "shard_count": shards,
            **extra,
            "jobs": self.jobs.count(),
            "skipped_records": len(self.store.skipped_records()),
            "started_at": rfc3339(self.started_at) if self.started_at else None,
            "uptime_seconds": round(time.monotonic() - self._started_mono, 3),
            "history_prefix": self.history.prefix,
            "in_flight": self.deliveries.in_flight,
        }

    # --- RunView (what `get` and `list` report besides the record) -------------------------------

    def next_run(self, job: Job, now: datetime) -> datetime | None:
        term = self.leadership.term_for(job.id)
        if term is not None and job.next_run_time is not None:
            return term.next_slot(job.id, now)
        return display_next(job, now)

    def run_state(self, subject: str) -> RunState | None:
        return self.states.get(subject)

    async def refresh(self, subjects: list[str] | None) -> None:
        if self.settings.shards > 1:  # a standby of one shard follows the stream instead
            await self.states.refresh(self.nc, subjects)

    # --- wiring callbacks ----------------------------------------------------------------------

    def _on_job_change(self, job_id: str, job: Job | None) -> None:
        if job is None:
            self.states.drop(job_id)
            self.metrics.forget(job_id)
        if self.leadership.changed(job_id, job):
            self.scheduler.wakeup()

    async def _on_disconnected(self) -> None:
        if self._stopped:
            return
        logger.bind(instance_id=self.settings.instance_id).warning("NATS connection lost")
        if hasattr(self, "wire"):
            self.wire.connection_lost()
        if hasattr(self, "leadership"):
            self.leadership.connection_lost()

    async def _on_reconnected(self) -> None:
        logger.bind(instance_id=self.settings.instance_id).info("NATS connection restored")
        if hasattr(self, "leadership"):
            self.leadership.connection_restored()

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
