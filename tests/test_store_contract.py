"""APScheduler's job store contract, run against two stores.

`MemoryJobStore` is APScheduler's reference behaviour; `JetStreamJobStore` must behave the
same through the `BaseJobStore` interface. For the JetStream store every mutating test
also checks durability: after `flush()` a second, freshly started store on the same
bucket must see exactly the same jobs (same order, next run times, triggers, arguments).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from nats_apscheduler.store import JetStreamJobStore


def dummy(*args: Any, **kwargs: Any) -> None:
    """Job function (never run: the schedulers here stay paused)."""


def dummy2(*args: Any, **kwargs: Any) -> None:
    """Second job function, to tell jobs apart by function."""


ALLOWED = [dummy, dummy2]
T0 = datetime(2030, 5, 3, 12, 0, tzinfo=UTC)
PROBE = datetime(2030, 1, 1, tzinfo=UTC)  # a fixed "now" for comparing triggers


@dataclass
class Harness:
    kind: str
    store: BaseJobStore
    scheduler: BackgroundScheduler
    url: str | None = None
    bucket: str | None = None

    def job(
        self,
        job_id: str,
        run_date: datetime,
        *,
        func: Any = dummy,
        paused: bool = False,
        interval: timedelta | None = None,
        **changes: Any,
    ) -> Job:
        """A Job as APScheduler's own store tests build them (not added to any store)."""
        trigger = (
            IntervalTrigger(seconds=interval.total_seconds(), start_date=run_date, timezone=UTC)
            if interval is not None
            else DateTrigger(run_date=run_date, timezone=UTC)
        )
        kwargs: dict[str, Any] = {
            "id": job_id,
            "func": func,
            "trigger": trigger,
            "executor": "default",
            "args": (1, "two", [3.5, None]),
            "kwargs": {"key": {"nested": True}},
            "name": f"job {job_id}",
            "misfire_grace_time": 1,
            "coalesce": False,
            "max_instances": 1,
            "next_run_time": None if paused else run_date,
        }
        kwargs.update(changes)
        return Job(self.scheduler, **kwargs)

    def add(self, job_id: str, run_date: datetime, **kwargs: Any) -> Job:
        job = self.job(job_id, run_date, **kwargs)
        self.store.add_job(job)
        return job


def snapshot(job: Job) -> tuple[Any, ...]:
    """Everything a store must preserve about a job, in comparable form."""
    nrt = job.next_run_time
    return (
        job.id,
        job.func_ref,
        tuple(job.args),
        dict(job.kwargs),
        job.name,
        job.executor,
        job.misfire_grace_time,
        job.coalesce,
        job.max_instances,
        None if nrt is None else nrt.astimezone(UTC),
        type(job.trigger).__name__,
        str(job.trigger),
        job.trigger.get_next_fire_time(None, PROBE),
    )


def ids(jobs: list[Job]) -> list[str]:
    return [job.id for job in jobs]


def _start(store: BaseJobStore) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_jobstore(store, "default")
    scheduler.start(paused=True)
    return scheduler


@pytest.fixture(params=["memory", "jetstream"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    if request.param == "memory":
        store: BaseJobStore = MemoryJobStore()
        h = Harness("memory", store, _start(store))
    else:
        url = request.getfixturevalue("nats_url")
        bucket = request.getfixturevalue("bucket")
        store = JetStreamJobStore(bucket=bucket, url=url, functions=ALLOWED, timeout=5)
        h = Harness("jetstream", store, _start(store), url, bucket)
    yield h
    if h.scheduler.running:
        h.scheduler.shutdown(wait=False)


def assert_durable(h: Harness) -> None:
    """JetStream only: flush, then a second fresh store on the bucket sees the same jobs."""
    if h.kind != "jetstream":
        return
    assert isinstance(h.store, JetStreamJobStore)
    h.store.flush()
    other = JetStreamJobStore(bucket=h.bucket, url=h.url, functions=ALLOWED, timeout=5)
    scheduler = _start(other)
    try:
        assert other.skipped_records() == {}
        mine = [snapshot(job) for job in h.store.get_all_jobs()]
        theirs = [snapshot(job) for job in other.get_all_jobs()]
        assert theirs == mine
        for job in h.store.get_all_jobs():
            found = other.lookup_job(job.id)
            assert found is not None and snapshot(found) == snapshot(job)
    finally:
        scheduler.shutdown(wait=False)


# --- add / lookup ------------------------------------------------------------------------


def test_add_and_lookup(harness: Harness) -> None:
    job = harness.add("a", T0, interval=timedelta(minutes=5))
    found = harness.store.lookup_job("a")
    assert found == job  # APScheduler compares jobs by id
    assert found is not None
    assert found.next_run_time == T0
    assert found.func is dummy
    assert isinstance(found.trigger, IntervalTrigger)
    assert found.trigger.interval == timedelta(minutes=5)
    assert snapshot(found) == snapshot(job)
    assert_durable(harness)


def test_add_paused_job(harness: Harness) -> None:
    harness.add("p", T0, paused=True, func=dummy2)
    found = harness.store.lookup_job("p")
    assert found is not None and found.next_run_time is None and found.func is dummy2
    assert_durable(harness)


def test_lookup_missing_job(harness: Harness) -> None:
    assert harness.store.lookup_job("nope") is None
    harness.add("a", T0)
    assert harness.store.lookup_job("nope") is None


def test_add_conflicting_id(harness: Harness) -> None:
    harness.add("a", T0, name="original")
    with pytest.raises(ConflictingIdError):
        harness.add("a", T0 + timedelta(days=1), name="impostor", func=dummy2)
    found = harness.store.lookup_job("a")
    assert found is not None
    assert (found.name, found.next_run_time, found.func) == ("original", T0, dummy)
    assert len(harness.store.get_all_jobs()) == 1
    assert_durable(harness)


def test_add_through_scheduler_api(harness: Harness) -> None:
    job = harness.scheduler.add_job(
        dummy, "interval", minutes=10, id="s1", args=["x"], next_run_time=T0
    )
    paused = harness.scheduler.add_job(dummy2, "date", run_date=T0, id="s2", next_run_time=None)
    assert ids(harness.scheduler.get_jobs()) == ["s1", "s2"]
    assert harness.scheduler.get_job("s1") == job
    assert harness.scheduler.get_job("s2") == paused
    harness.scheduler.modify_job("s1", name="renamed")
    harness.scheduler.resume_job("s2")  # computes its next run time from the trigger
    found = harness.store.lookup_job("s2")
    assert found is not None and found.next_run_time == T0
    assert harness.store.lookup_job("s1").name == "renamed"  # type: ignore[union-attr]
    assert_durable(harness)


# --- update ------------------------------------------------------------------------------


def test_update_job_with_replacement(harness: Harness) -> None:
    job1 = harness.add("j1", T0)
    job2 = harness.add("j2", T0 - timedelta(days=1000), func=dummy2)
    assert ids(harness.store.get_all_jobs()) == [job2.id, job1.id]

    replacement = harness.job("j2", T0 + timedelta(days=1), max_instances=6, name="new name")
    harness.store.update_job(replacement)

    jobs = harness.store.get_all_jobs()
    assert ids(jobs) == ["j1", "j2"]  # re-sorted by next_run_time
    found = harness.store.lookup_job("j2")
    assert found is not None
    assert (found.max_instances, found.name, found.func) == (6, "new name", dummy)
    assert found.next_run_time == T0 + timedelta(days=1)
    assert harness.store.get_next_run_time() == T0
    assert_durable(harness)


def test_update_job_in_place_resorts(harness: Harness) -> None:
    """The scheduler's fire path: modify the stored object itself, then update_job()."""
    for i, name in enumerate(["c", "a", "b"]):
        harness.add(name, T0 + timedelta(hours=i))
    assert ids(harness.store.get_all_jobs()) == ["c", "a", "b"]

    job = harness.store.lookup_job("c")
    assert job is not None
    job._modify(next_run_time=T0 + timedelta(hours=5))
    harness.store.update_job(job)
    assert ids(harness.store.get_all_jobs()) == ["a", "b", "c"]
    assert harness.store.get_next_run_time() == T0 + timedelta(hours=1)
    assert ids(harness.store.get_due_jobs(T0 + timedelta(hours=2))) == ["a", "b"]

    # Same next_run_time, other attributes changed: position kept, data replaced.
    job = harness.store.lookup_job("b")
    assert job is not None
    job._modify(args=("changed",), kwargs={"k": 1})
    harness.store.update_job(job)
    found = harness.store.lookup_job("b")
    assert found is not None and found.args == ("changed",) and found.kwargs == {"k": 1}
    assert ids(harness.store.get_all_jobs()) == ["a", "b", "c"]
    assert_durable(harness)


def test_update_job_pause_and_resume(harness: Harness) -> None:
    harness.add("a", T0)
    harness.add("b", T0 + timedelta(hours=1))
    job = harness.store.lookup_job("a")
    assert job is not None
    job._modify(next_run_time=None)
    harness.store.update_job(job)
    assert ids(harness.store.get_all_jobs()) == ["b", "a"]
    assert harness.store.get_next_run_time() == T0 + timedelta(hours=1)
    assert ids(harness.store.get_due_jobs(T0 + timedelta(days=365))) == ["b"]
    assert_durable(harness)

    job = harness.store.lookup_job("a")
    assert job is not None
    job._modify(next_run_time=T0 + timedelta(hours=2))
    harness.store.update_job(job)
    assert ids(harness.store.get_all_jobs()) == ["b", "a"]
    assert harness.store.lookup_job("a").next_run_time == T0 + timedelta(hours=2)  # type: ignore[union-attr]
    assert_durable(harness)


def test_update_missing_job(harness: Harness) -> None:
    harness.add("a", T0)
    with pytest.raises(JobLookupError):
        harness.store.update_job(harness.job("ghost", T0))
    assert harness.store.lookup_job("ghost") is None
    assert ids(harness.store.get_all_jobs()) == ["a"]
    assert_durable(harness)


# --- remove ------------------------------------------------------------------------------


def test_remove_job(harness: Harness) -> None:
    harness.add("a", T0)
    harness.add("b", T0 + timedelta(minutes=1))
    harness.add("c", T0, paused=True)
    harness.store.remove_job("a")
    assert harness.store.lookup_job("a") is None
    assert ids(harness.store.get_all_jobs()) == ["b", "c"]
    harness.store.remove_job("c")
    assert ids(harness.store.get_all_jobs()) == ["b"]
    assert_durable(harness)


def test_remove_missing_job(harness: Harness) -> None:
    with pytest.raises(JobLookupError):
        harness.store.remove_job("ghost")
    harness.add("a", T0)
    harness.store.remove_job("a")
    with pytest.raises(JobLookupError):
        harness.store.remove_job("a")  # removing twice
    assert harness.store.get_all_jobs() == []
    assert_durable(harness)


def test_remove_then_add_same_id(harness: Harness) -> None:
    harness.add("a", T0, name="first")
    harness.store.remove_job("a")
    harness.add("a", T0 + timedelta(hours=1), name="second", func=dummy2)
    found = harness.store.lookup_job("a")
    assert found is not None and found.name == "second"
    assert_durable(harness)


def test_remove_all_jobs(harness: Harness) -> None:
    harness.add("a", T0)
    harness.add("b", T0 + timedelta(hours=1))
    harness.add("c", T0, paused=True)
    harness.store.remove_all_jobs()
    assert harness.store.get_all_jobs() == []
    assert harness.store.lookup_job("a") is None
    assert harness.store.get_next_run_time() is None
    assert_durable(harness)
    harness.add("a", T0)  # ids are free again
    assert ids(harness.store.get_all_jobs()) == ["a"]
    assert_durable(harness)


# --- queries -----------------------------------------------------------------------------


def test_get_due_jobs(harness: Harness) -> None:
    harness.add("late", T0 + timedelta(hours=1))
    harness.add("b-tie", T0)
    harness.add("early", T0 - timedelta(days=3))
    harness.add("a-tie", T0)
    harness.add("paused", T0 - timedelta(days=30), paused=True)

    store = harness.store
    assert ids(store.get_due_jobs(T0 - timedelta(days=4))) == []
    assert ids(store.get_due_jobs(T0 - timedelta(days=3))) == ["early"]  # inclusive
    assert ids(store.get_due_jobs(T0)) == ["early", "a-tie", "b-tie"]
    assert ids(store.get_due_jobs(T0 + timedelta(minutes=59))) == ["early", "a-tie", "b-tie"]
    assert ids(store.get_due_jobs(T0 + timedelta(days=9999))) == [
        "early",
        "a-tie",
        "b-tie",
        "late",
    ]
    # `now` in another zone is compared as an instant.
    from zoneinfo import ZoneInfo

    assert ids(store.get_due_jobs(T0.astimezone(ZoneInfo("America/New_York")))) == [
        "early",
        "a-tie",
        "b-tie",
    ]
    assert_durable(harness)


def test_get_next_run_time(harness: Harness) -> None:
    store = harness.store
    assert store.get_next_run_time() is None
    harness.add("paused", T0, paused=True)
    assert store.get_next_run_time() is None  # only paused jobs
    harness.add("b", T0 + timedelta(hours=2))
    assert store.get_next_run_time() == T0 + timedelta(hours=2)
    harness.add("a", T0 + timedelta(hours=1))
    assert store.get_next_run_time() == T0 + timedelta(hours=1)
    store.remove_job("a")
    assert store.get_next_run_time() == T0 + timedelta(hours=2)
    assert_durable(harness)


def test_get_all_jobs_order(harness: Harness) -> None:
    harness.add("p2", T0, paused=True)
    harness.add("z", T0 + timedelta(seconds=1))
    harness.add("p1", T0, paused=True)
    harness.add("b", T0)
    harness.add("a", T0)
    harness.add("first", T0 - timedelta(microseconds=1))
    assert ids(harness.store.get_all_jobs()) == ["first", "a", "b", "z", "p1", "p2"]
    assert_durable(harness)
