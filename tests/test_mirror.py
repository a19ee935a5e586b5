"""The job store's in-memory copy, pure: raw records decoded when first needed, APScheduler's
order built on first use, local changes with APScheduler's errors, what KV says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger

from nats_apscheduler._mirror import Mirror, Raw
from nats_apscheduler.codec import RecordEncoder, peek_next_run_time

T0 = datetime(2030, 1, 1, tzinfo=UTC)
SCHEDULER = BackgroundScheduler(timezone=UTC)


def job(job_id: str, at: datetime | None) -> Job:
    return Job(
        SCHEDULER,
        id=job_id,
        func="builtins:dict",  # takes any keyword argument
        trigger=DateTrigger(run_date=at or T0, timezone=UTC),
        executor="default",
        args=(),
        kwargs={"next_run_time": "a key that must not fool the peek"},
        name=job_id,
        misfire_grace_time=1,
        coalesce=True,
        max_instances=1,
        next_run_time=at,
    )


class Decoder:
    """Stands in for the store's decoder: counts what it decodes."""

    def __init__(self, jobs: dict[str, Job]) -> None:
        self.jobs = jobs
        self.decoded: list[str] = []

    def __call__(self, job_id: str, value: bytes) -> Job | str:
        self.decoded.append(job_id)
        return self.jobs.get(job_id) or "unreadable"


def raw(j: Job) -> Raw:
    value = RecordEncoder().encode(j, "writer")
    return Raw(value, peek_next_run_time(value))


def loaded(*jobs: Job) -> tuple[Mirror, Decoder]:
    decoder = Decoder({j.id: j for j in jobs})
    mirror = Mirror(decoder)
    for j in jobs:
        mirror.replace(j.id, raw(j))
    return mirror, decoder


def test_peek_reads_the_record_s_own_next_run_time() -> None:
    assert peek_next_run_time(RecordEncoder().encode(job("a", T0), "w")) == T0
    assert peek_next_run_time(RecordEncoder().encode(job("a", None), "w")) is None
    for bad in (b"{}", b'{"v":1,"next_run_time":5}', b'{"v":2,"next_run_time":null}'):
        with pytest.raises(ValueError):
            peek_next_run_time(bad)


def test_raw_records_are_decoded_when_first_needed() -> None:
    mirror, decoder = loaded(job("a", T0), job("b", T0 + timedelta(hours=1)), job("p", None))
    assert len(mirror) == 3 and "a" in mirror and decoder.decoded == []
    assert [(i, t) for i, t, j in sorted(mirror.records())] == [
        ("a", T0),
        ("b", T0 + timedelta(hours=1)),
        ("p", None),
    ]
    assert decoder.decoded == []
    found = mirror.lookup("a")
    assert found is not None and found.id == "a" and decoder.decoded == ["a"]
    assert mirror.lookup("a") is found and decoder.decoded == ["a"]  # once
    assert [j.id for j in mirror.due(T0)] == ["a"]  # the order: everything decoded
    assert sorted(decoder.decoded) == ["a", "b", "p"]
    assert [j.id for j in mirror.all()] == ["a", "b", "p"]  # paused last


def test_an_unreadable_record_is_skipped_when_decoded() -> None:
    mirror, _ = loaded(job("a", T0))
    mirror.replace("bad", Raw(b'{"v":1,"next_run_time":null}', None))
    assert mirror.lookup("bad") is None
    assert mirror.skipped == {"bad": "unreadable"} and "bad" not in mirror
    with pytest.raises(ConflictingIdError):
        mirror.add(job("bad", T0))  # its id stays reserved until removed
    mirror.remove("bad")
    mirror.add(job("bad", T0))


def test_local_changes_keep_the_order_once_built() -> None:
    mirror, _ = loaded(job("a", T0 + timedelta(hours=2)), job("b", T0 + timedelta(hours=1)))
    assert [j.id for j in mirror.all()] == ["b", "a"]
    mirror.add(job("c", T0))
    with pytest.raises(ConflictingIdError):
        mirror.add(job("c", T0))
    mirror.update(job("a", T0 - timedelta(hours=1)))
    assert [j.id for j in mirror.all()] == ["a", "c", "b"]
    mirror.remove("c")
    with pytest.raises(JobLookupError):
        mirror.remove("c")
    with pytest.raises(JobLookupError):
        mirror.update(job("c", T0))
    assert [j.id for j in mirror.due(T0)] == ["a"]
    assert mirror.next_run_time() == T0 - timedelta(hours=1)


def test_what_kv_says_replaces_the_local_copy() -> None:
    mirror, _ = loaded(job("a", T0))
    first = mirror.lookup("a")
    assert first is not None
    newer = job("a", T0 + timedelta(hours=1))
    mirror.replace("a", newer)
    assert mirror.lookup("a") is newer and mirror.is_stale(first)
    mirror.replace("a", None)
    assert mirror.lookup("a") is None and len(mirror) == 0
    mirror.replace("x", None, skipped="forged")
    assert mirror.skipped == {"x": "forged"}
    assert mirror.remove_all() == ["x"] and mirror.skipped == {}
