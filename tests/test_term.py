"""A leader's term against a real nats-server: slices that yield, fires of a herd, progress
marks (their compare-and-set and what a new term derives from them), finished jobs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import KeyValueConfig

from nats_apscheduler._wire import Wire
from nats_apscheduler.agenda import Mark
from nats_apscheduler.errors import MarkTakenOver
from nats_apscheduler.fire import Firer
from nats_apscheduler.history import RunStates
from nats_apscheduler.jobs import JOBSTORE, JobManager, Limits
from nats_apscheduler.progress import Progress
from nats_apscheduler.store import JetStreamJobStore
from nats_apscheduler.term import Term
from tests.helpers.waiting import eventually


class Fence:
    def __init__(self) -> None:
        self.up = True

    def is_leader_now(self) -> bool:
        return self.up

    def __call__(self) -> bool:
        return self.up


@dataclass
class Rig:
    nc: Client
    store: JetStreamJobStore
    jobs: JobManager
    progress: Progress
    firer: Firer
    fence: Fence
    bucket: str
    terms: list[Term] = field(default_factory=list)
    deposed: list[str] = field(default_factory=list)

    def term(self, mark: Mark | None, epoch: int = 7, **options: Any) -> Term:
        term = Term(
            epoch,
            "inst-1",
            self.store,
            self.firer,
            self.progress,
            self.fence,
            mark,
            datetime.now(UTC) - timedelta(hours=1),
            on_deposed=self.deposed.append,
            **options,
        )
        self.terms.append(term)
        return term


@pytest.fixture
async def rig(nc: Client, bucket: str) -> AsyncIterator[Rig]:
    store = JetStreamJobStore(bucket=f"{bucket}-jobs", nc=nc)
    await store.open()
    scheduler = AsyncIOScheduler(timezone=UTC)
    scheduler.add_jobstore(store, JOBSTORE)
    scheduler.start(paused=True)
    await nc.jetstream().create_key_value(KeyValueConfig(bucket=f"{bucket}-leader"))
    wire = Wire(nc)
    progress = Progress(nc, f"{bucket}-leader", wire)
    await progress.start()
    fence = Fence()
    firer = Firer(wire, fence, "inst-1", None, RunStates())
    jobs = JobManager(scheduler, store, Limits(max_payload=nc.max_payload))
    rig = Rig(nc, store, jobs, progress, firer, fence, bucket)
    yield rig
    for term in rig.terms:
        term.stop()
    await progress.stop()
    await store.aclose()
    scheduler.shutdown(wait=False)


def every(subject: str, seconds: int, start: datetime) -> dict[str, Any]:
    anchor = start.isoformat().replace("+00:00", "Z")
    return {"target": {"subject": subject}, "schedule": {"every": f"{seconds}s", "start": anchor}}


async def collect(nc: Client, subject: str) -> tuple[list[Msg], Any]:
    got: list[Msg] = []

    async def on_msg(msg: Msg) -> None:
        got.append(msg)

    sub = await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    await nc.flush()
    return got, sub


async def herd(rig: Rig, prefix: str, n: int, every_s: int = 3600) -> datetime:
    """`n` jobs whose first slot is one shared moment just ahead; returns it, once passed."""
    slot = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    await asyncio.gather(
        *(rig.jobs.create(every(f"{prefix}.{i}", every_s, slot)) for i in range(n))
    )
    await asyncio.sleep(max(0.0, (slot - datetime.now(UTC)).total_seconds()) + 0.01)
    return slot


async def run_until_idle(term: Term, now_limit: float = 30.0) -> int:
    """Call `process` as the scheduler would, yielding between slices; returns slices."""
    slices = 0
    deadline = time.monotonic() + now_limit
    while time.monotonic() < deadline:
        wait = term.process()
        slices += 1
        if wait is None or wait > 0:
            return slices
        await asyncio.sleep(0)
    raise AssertionError("the term never became idle")


async def test_a_herd_is_worked_through_in_slices(rig: Rig) -> None:
    n = 5000
    got, sub = await collect(rig.nc, f"{rig.bucket}.herd.>")
    slot = await herd(rig, f"{rig.bucket}.herd", n)
    term = rig.term(None, slice_jobs=1000, slice_seconds=1.0)
    slices = await run_until_idle(term)
    assert slices >= n // 1000  # at most 1,000 jobs a slice
    await eventually(lambda: len(got) == n)
    assert len({m.subject for m in got}) == n
    assert {m.headers["Nats-Cron-Scheduled"] for m in got if m.headers} == {
        slot.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    }
    assert term.processed is not None and term.processed.handled >= slot
    await sub.unsubscribe()


async def test_a_slice_yields_after_its_time_budget(rig: Rig) -> None:
    await herd(rig, f"{rig.bucket}.t", 3000)
    term = rig.term(None, slice_jobs=100_000, slice_seconds=0.002)
    await run_until_idle(term)
    assert term.slices > 2
    # One look at the clock every 64 jobs: a slice overruns its budget by at most that.
    assert term.longest_slice < 0.25


async def test_marks_are_stored_and_a_new_term_starts_after_them(rig: Rig) -> None:
    got, sub = await collect(rig.nc, f"{rig.bucket}.tick.>")
    await herd(rig, f"{rig.bucket}.tick", 1, every_s=60)
    stored = await rig.progress.read()
    assert stored.mark is None and stored.revision == 0
    term = rig.term(None, mark_interval=0.05)
    term.start()
    await run_until_idle(term)
    await eventually(lambda: term.stored is not None)
    assert term.stored == term.processed
    read = await rig.progress.read()
    assert read.mark == term.stored and read.epoch == 7 and read.instance == "inst-1"
    await eventually(lambda: len(got) == 1)
    fired = len(got)
    term.stop()
    # The next term, from the stored mark: nothing fired again.
    nxt = rig.term(read.mark, epoch=8)
    assert nxt.process() is not None
    await rig.nc.flush()
    assert len(got) == fired
    await sub.unsubscribe()


async def test_an_idle_term_s_mark_follows_the_records_it_applied(rig: Rig) -> None:
    await herd(rig, f"{rig.bucket}.tick", 1, every_s=3600)
    term = rig.term(None, mark_interval=0.05)
    term.start()
    await run_until_idle(term)
    await eventually(lambda: term.stored is not None, 5, "a first mark")
    assert term.stored is not None
    first = term.stored.applied
    # A change the term does not fire (nothing due): its mark still comes to name it.
    await rig.jobs.create(every(f"{rig.bucket}.other", 3600, datetime.now(UTC)))
    await eventually(lambda: rig.store.applied_seq > first, 5, "the change applied")
    await eventually(
        lambda: term.stored is not None and term.stored.applied >= rig.store.applied_seq,
        5,
        lambda: f"the stored mark names {term.stored}, the store {rig.store.applied_seq}",
    )


async def test_a_forced_run_is_not_fired_again_by_the_next_term(rig: Rig) -> None:
    got, sub = await collect(rig.nc, f"{rig.bucket}.forced")
    subject = f"{rig.bucket}.forced"
    await rig.jobs.create(every(subject, 3600, datetime.now(UTC) + timedelta(hours=1)))
    await rig.jobs.pause(subject)
    term = rig.term(None, mark_interval=0.05)
    term.start()
    await rig.jobs.trigger(subject, force=True)
    term.changed(subject, rig.store.lookup_job(subject))  # as the store's listener would
    await run_until_idle(term)
    await eventually(lambda: len(got) == 1, 5, "the forced run")
    # The record written by the trigger comes back with its revision; the mark names it.
    await eventually(
        lambda: term.stored is not None and term.stored.applied >= rig.store.revision(subject),
        5,
        lambda: f"stored {term.stored}, the record's revision {rig.store.revision(subject)}",
    )
    mark = term.stored
    term.stop()
    nxt = rig.term(mark, epoch=8)
    await run_until_idle(nxt)
    await rig.nc.flush()
    assert len(got) == 1, [m.headers for m in got]
    await sub.unsubscribe()


async def test_a_late_write_of_a_deposed_leader_is_refused(rig: Rig) -> None:
    mark = Mark(datetime.now(UTC), 1)
    assert await rig.progress.write(mark, 1, "old", rig.fence)
    old_revision = rig.progress.revision
    # A new leader claims the mark (compare-and-set on what it read).
    new = Progress(rig.nc, f"{rig.bucket}-leader", Wire(rig.nc))
    await new.start()
    try:
        read = await new.read()
        new.revision = read.revision
        assert await new.write(mark, 2, "new", rig.fence)
        # The deposed one still believes in its old revision: its write is refused.
        assert rig.progress.revision == old_revision
        with pytest.raises(MarkTakenOver):
            await rig.progress.write(Mark(datetime.now(UTC), 2), 1, "old", rig.fence)
        assert (await new.read()).epoch == 2
    finally:
        await new.stop()


async def test_a_fenced_mark_write_sends_nothing(rig: Rig) -> None:
    rig.fence.up = False
    assert not await rig.progress.write(Mark(datetime.now(UTC), 1), 1, "x", rig.fence)
    assert (await rig.progress.read()).mark is None


async def test_a_one_shot_job_is_deleted_once_a_mark_covers_its_fire(rig: Rig) -> None:
    subject = f"{rig.bucket}.once"
    got, sub = await collect(rig.nc, subject)
    at = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    await rig.jobs.create({"target": {"subject": subject}, "schedule": {"at": at}})
    term = rig.term(None, mark_interval=0.05)
    term.start()
    await run_until_idle(term)
    await eventually(lambda: len(got) == 1)
    await eventually(lambda: rig.store.lookup_job(subject) is None)
    kv = await rig.nc.jetstream().key_value(f"{rig.bucket}-jobs")
    await rig.store.aflush()
    assert [key async for key in _keys(kv)] == []
    await sub.unsubscribe()


async def _keys(kv: Any) -> Any:
    try:
        for key in await kv.keys():
            yield key
    except Exception:  # nats-py raises NoKeysError on an empty bucket
        return


async def test_a_fenced_slice_writes_nothing_and_ends_the_term(rig: Rig) -> None:
    subject = f"{rig.bucket}.fenced"
    got, sub = await collect(rig.nc, f"{subject}.>")
    await herd(rig, subject, 1)
    term = rig.term(None)
    rig.fence.up = False
    assert term.process() is not None  # looked, did nothing
    rig.fence.up = True
    rig.firer._fence = Fence()  # the firer's own check fails at the last moment
    rig.firer._fence.up = False  # type: ignore[attr-defined]
    assert term.process() is None
    assert rig.deposed == ["fenced while writing fires"]
    assert term.processed is None  # never marked past the slot
    await rig.nc.flush()
    assert got == []
    await sub.unsubscribe()


async def test_a_mark_names_the_records_it_covers(rig: Rig) -> None:
    """A job written after the mark's read of the bucket starts at its own next run."""
    got, sub = await collect(rig.nc, f"{rig.bucket}.>")
    await herd(rig, f"{rig.bucket}.first", 1, every_s=60)
    term = rig.term(None)
    await run_until_idle(term)
    await eventually(lambda: len(got) == 1)
    assert term.processed is not None
    mark = term.processed
    # A revision after mark.applied, whose first slot the old term's mark has passed.
    await herd(rig, f"{rig.bucket}.later", 1, every_s=60)
    term.stop()
    nxt = rig.term(mark, epoch=8)
    await run_until_idle(nxt)
    await eventually(lambda: len(got) == 2)
    assert sorted(m.subject for m in got) == [f"{rig.bucket}.first.0", f"{rig.bucket}.later.0"]
    await sub.unsubscribe()


async def test_a_term_fires_jobs_it_loaded_without_decoding(rig: Rig) -> None:
    """A new leader builds its agenda from undecoded records; each job is decoded when due
    (a forged record is then skipped, never fired)."""
    got, sub = await collect(rig.nc, f"{rig.bucket}.raw.>")
    slot = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    for i in range(3):
        await rig.jobs.create(every(f"{rig.bucket}.raw.{i}", 60, slot))
    kv = await rig.nc.jetstream().key_value(f"{rig.bucket}-jobs")
    forged = json.loads((await kv.get(f"{rig.bucket}.raw.2")).value or b"")
    forged["func"] = "os:system"  # off the allow-list
    await kv.put(f"{rig.bucket}.raw.2", json.dumps(forged).encode())
    fresh = JetStreamJobStore(bucket=f"{rig.bucket}-jobs", nc=rig.nc)
    await fresh.open()
    try:
        assert fresh.raw(f"{rig.bucket}.raw.0") is not None  # loaded, not decoded
        rig.store = fresh
        term = rig.term(None)
        await asyncio.sleep(max(0.0, (slot - datetime.now(UTC)).total_seconds()) + 0.01)
        await run_until_idle(term)
        await eventually(lambda: len(got) == 2)
        assert sorted(m.subject for m in got) == [f"{rig.bucket}.raw.0", f"{rig.bucket}.raw.1"]
        assert list(fresh.skipped_records()) == [f"{rig.bucket}.raw.2"]
    finally:
        await fresh.aclose()
        await sub.unsubscribe()
