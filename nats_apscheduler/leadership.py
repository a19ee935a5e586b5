"""The election adapter: the shards' leases won and lost turn into terms on the scheduler.

Each shard (see `shards`) has an `Election` on its own key. On winning one, this instance
catches its copies of the jobs and of the run history up with KV, reads the shard's progress
mark, claims it with its epoch, reads the retry records of the shard's jobs (`retry`),
builds a `Term` for the shard's jobs and hands it to the scheduler; on losing one, the term
is dropped at once (its fence is already down). With several shards, a balancing round every
TTL/3 keeps this instance within its fair share: above it, it stops one term, stores its final
mark and releases that lease (a clean handover). A clean stop does the same for every shard.
Knows nothing of the API.
"""

from __future__ import annotations

import asyncio
import functools
import gc
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import nats.errors
from apscheduler.job import Job
from loguru import logger
from nats.aio.client import Client

from nats_apscheduler._kvwrite import KVWrites
from nats_apscheduler._tasks import cancel_and_wait
from nats_apscheduler._wire import Wire
from nats_apscheduler.delivery import Deliveries
from nats_apscheduler.election import Election
from nats_apscheduler.errors import MarkTakenOver
from nats_apscheduler.fire import FireObserver, Firer, rfc3339
from nats_apscheduler.history import History, RunStates
from nats_apscheduler.progress import Progress, Stored
from nats_apscheduler.retry import Retries
from nats_apscheduler.scheduler import BatchScheduler
from nats_apscheduler.shards import (
    Members,
    check_shards,
    fair_share,
    lease_key,
    preference,
    progress_key,
    shard_of,
)
from nats_apscheduler.term import JobSource, Term

_CLAIM_ATTEMPTS = 3


class Leadership:
    def __init__(
        self,
        nc: Client,
        bucket: str,
        instance_id: str,
        ttl: float,
        shards: int,
        replicas: int,
        store: JobSource,
        scheduler: BatchScheduler,
        states: RunStates,
        history: History | None,
        wire: Wire,
        observer: FireObserver | None,
        catch_up: Callable[[float], Any],
        deliveries: Deliveries | None = None,
    ) -> None:
        """`catch_up(timeout)`: wait until the copy of the jobs holds what KV holds;
        `deliveries`: the instance's requests in flight (None: every fire a publish)."""
        self._nc = nc
        self.bucket = bucket
        self.instance_id = instance_id
        self.ttl = ttl
        self.shards = shards
        self._store = store
        self._scheduler = scheduler
        self._states = states
        self._history = history
        self._wire = wire
        self._observer = observer
        self._catch_up = catch_up
        self._deliveries = deliveries
        self._kv_writes = KVWrites(nc, bucket)  # the retry records of every term
        self.members = Members(nc, bucket, instance_id, ttl, on_change=self._members_changed)
        self.elections = [
            Election(
                nc,
                bucket,
                instance_id,
                ttl,
                replicas=replicas,
                key=lease_key(shard, shards),
                on_won=functools.partial(self._won, shard),
                on_lost=functools.partial(self._lost, shard),
                eligible=self._eligible,
            )
            for shard in range(shards)
        ]
        self._progress: dict[int, Progress] = {}
        self.terms: dict[int, Term] = {}
        self._leading: dict[int, asyncio.Task[None]] = {}
        self._balancer: asyncio.Task[None] | None = None
        self._stopping = False
        self.handovers = 0  #: shards released to balance the load
        self.unconfirmed = 0

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Campaign for the shards (the leader bucket is created if missing)."""
        first = self.elections[0]
        await first.ensure_bucket()
        await check_shards(self._nc, self.bucket, self.shards)
        await self._kv_writes.start()
        if self.shards > 1:
            await self.members.start()  # who else is alive, before campaigning
        for election in self.elections:
            await election.start()
        if self.shards > 1:
            self._balancer = asyncio.get_running_loop().create_task(
                self._balance_loop(), name="shard-balancer"
            )

    async def stop(self) -> None:
        """Stop firing; store each held shard's final mark; hand the leases over."""
        self._stopping = True
        await cancel_and_wait([self._balancer, *self._leading.values()])
        for shard in list(self.terms):
            await self._finish(shard)
        if self.shards > 1:
            await self.members.stop()  # first: the others' share grows before the releases
        for election in self.elections:
            await election.stop(release=True)
        for progress in self._progress.values():
            await progress.stop()
        await self._kv_writes.stop()

    # --- what the instance reports ----------------------------------------------------------------

    def held(self) -> list[int]:
        return [s for s, e in enumerate(self.elections) if e.is_leader_now()]

    def is_leading(self) -> bool:
        return any(election.is_leader_now() for election in self.elections)

    def term_for(self, job_id: str) -> Term | None:
        return self.terms.get(shard_of(job_id, self.shards))

    @property
    def running(self) -> bool:
        return all(election.running for election in self.elections)

    @property
    def transitions(self) -> int:
        return sum(election.transitions for election in self.elections)

    @property
    def refresh_failures(self) -> int:
        return sum(election.refresh_failures for election in self.elections)

    def shard_table(self) -> list[dict[str, Any]]:
        """Every shard's owner, epoch and since (as this instance's watches see them)."""
        out = []
        for shard, election in enumerate(self.elections):
            leader = election.leader
            out.append(
                {
                    "shard": shard,
                    "owner": leader.instance_id if leader else None,
                    "epoch": leader.epoch if leader else None,
                    "since": leader.since if leader else None,
                }
            )
        return out

    def connection_lost(self) -> None:
        for election in self.elections:
            election.connection_lost()

    def connection_restored(self) -> None:
        for election in self.elections:
            election.connection_restored()

    def changed(self, job_id: str, job: Job | None) -> bool:
        """A job's record changed: True if a term's agenda moved (wake the scheduler)."""
        term = self.term_for(job_id)
        return term is not None and term.changed(job_id, job)

    def owns(self, job_id: str) -> bool:
        """True if this instance leads the job's shard (its run state is this one's)."""
        return shard_of(job_id, self.shards) in self.terms

    # --- winning and losing ----------------------------------------------------------------------

    def _eligible(self) -> bool:
        if self._stopping:
            return False
        if self.shards == 1:
            return True
        return len(self.held()) < fair_share(self.shards, self.members.count())

    def _won(self, shard: int, epoch: int) -> None:
        task = asyncio.get_running_loop().create_task(
            self._lead(shard, epoch), name=f"lead-shard-{shard}"
        )
        self._leading[shard] = task
        task.add_done_callback(lambda _: self._leading.pop(shard, None))

    async def _lead(self, shard: int, epoch: int) -> None:
        """Start a term: fire only from copies of the jobs and the history that hold what KV
        holds now (bounded by the lease TTL: past it, firing late beats not firing)."""
        election = self.elections[shard]
        log = logger.bind(instance_id=self.instance_id, epoch=epoch, shard=shard)
        caught_up = await self._catch_up(self.ttl)
        if self.shards == 1:
            history_caught_up = await self._states.catch_up(timeout=self.ttl)
        else:  # the shard's run state as the stream holds it (live records may have gaps)
            history_caught_up = await self._states.load(
                self._nc, lambda subject: shard_of(subject, self.shards) == shard, self.ttl
            )
        progress = await self._progress_of(shard)
        stored = await self._claim(progress, election, epoch)
        if stored is None or election.epoch != epoch or not election.is_leader_now():
            if stored is None and election.epoch == epoch:
                election.step_down("could not read or claim the progress mark")
            return  # lost the lease meanwhile
        retries = Retries(
            self._nc,
            self.bucket,
            self._kv_writes,
            election.is_leader_now,
            owns=lambda subject: shard_of(subject, self.shards) == shard,
            epoch=epoch,
            instance_id=self.instance_id,
        )
        retries_loaded = await retries.load(timeout=self.ttl)
        if election.epoch != epoch or not election.is_leader_now():
            return  # lost the lease meanwhile
        if self.shards == 1:
            await self._states.pause()  # its own fires are the newest run state
        firer = Firer(
            self._wire,
            election,
            self.instance_id,
            self._history,
            self._states,
            observer=self._observer,
            shard=shard,
            deliveries=self._deliveries,
            retries=retries,
        )
        term = Term(
            epoch,
            self.instance_id,
            self._store,
            firer,
            progress,
            election.is_leader_now,
            stored.mark,
            election.won_at or datetime.now(UTC),
            on_deposed=election.step_down,
            shard=shard,
            shards=self.shards,
            retries=retries,
        )
        self.terms[shard] = term
        gc.freeze()  # the agenda's entries live as long as the term (see the job store)
        term.start()
        self._scheduler.add_term(shard, term)
        checks = (
            ("job watch", caught_up),
            ("history", history_caught_up),
            ("retry records", retries_loaded),
        )
        behind = [what for what, ok in checks if not ok]
        if stored.mark is not None:
            log = log.bind(handled=rfc3339(stored.mark.handled))
        if retries.pending():
            log = log.bind(retries=len(retries.pending()))
        log.info(f"leading: firing ({', '.join(behind)} behind)" if behind else "leading: firing")

    async def _progress_of(self, shard: int) -> Progress:
        progress = self._progress.get(shard)
        if progress is None:
            progress = Progress(
                self._nc, self.bucket, self._wire, key=progress_key(shard, self.shards)
            )
            await progress.start()
            self._progress[shard] = progress
        return progress

    async def _claim(self, progress: Progress, election: Election, epoch: int) -> Stored | None:
        """Read the shard's progress mark and write it back with our epoch, so that a deposed
        leader's late mark can no longer land; None if that failed."""
        for _ in range(_CLAIM_ATTEMPTS):
            try:
                stored = await asyncio.wait_for(progress.read(), self.ttl)
            except (nats.errors.Error, TimeoutError) as exc:
                logger.warning(
                    "reading the progress mark failed: {}", str(exc) or type(exc).__name__
                )
                return None
            progress.revision = stored.revision
            if stored.mark is None:
                return stored
            try:
                if await progress.write(
                    stored.mark, epoch, self.instance_id, election.is_leader_now
                ):
                    return stored
                return None
            except MarkTakenOver:
                continue  # a late write of the previous leader: read it again
        return None

    def _lost(self, shard: int, reason: str) -> None:
        log = logger.bind(instance_id=self.instance_id, shard=shard)
        if reason == "released":
            log.info("following: released the lease")
        else:
            log.warning("following: {}", reason)
        task = self._leading.pop(shard, None)
        if task is not None:
            task.cancel()
        term = self.terms.pop(shard, None)
        self._scheduler.remove_term(shard)
        if term is not None:
            unconfirmed = term.stop()
            if unconfirmed:
                self.unconfirmed += unconfirmed
                log.bind(epoch=term.epoch).warning(
                    "{} fire(s) since the last progress mark are not confirmed: the next "
                    "leader fires those slots again",
                    unconfirmed,
                )
        if self.shards == 1 and not self._stopping:
            task = asyncio.get_running_loop().create_task(self._states.follow(self._nc))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _finish(self, shard: int) -> bool:
        """End a term cleanly: stop firing the shard, store its final mark."""
        term = self.terms.pop(shard, None)
        self._scheduler.remove_term(shard)
        if term is None:
            return True
        ok = await term.finish(timeout=2.0)
        if not ok:
            logger.bind(instance_id=self.instance_id, shard=shard).warning(
                "stopping without a final progress mark: the next leader fires the last slots again"
            )
        return ok

    # --- balancing -----------------------------------------------------------------------------

    def _members_changed(self) -> None:
        for election in self.elections:
            election.nudge()  # a smaller share of an instance gone: campaign for its shards

    async def _balance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self._balance()
            except Exception as exc:  # never let balancing die silently
                logger.opt(exception=exc).error("shard balancing failed: {}", exc)

    async def _balance(self) -> None:
        """Above the fair share (a newcomer), hand one shard over cleanly."""
        held = self.held()
        share = fair_share(self.shards, self.members.count())
        if len(held) <= share:
            return
        shard = min(held, key=lambda s: preference(self.members.token, s))
        log = logger.bind(instance_id=self.instance_id, shard=shard)
        log.info(
            "handing shard {} over ({} held, fair share {} of {} shards over {} instances)",
            shard,
            len(held),
            share,
            self.shards,
            self.members.count(),
        )
        await self._finish(shard)
        if await self.elections[shard].release():
            self.handovers += 1
