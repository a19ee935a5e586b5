"""`Mirror`: the job store's in-memory copy of the jobs bucket. Pure: no asyncio, no NATS.

It holds, per job id, either an APScheduler `Job` or, until someone needs the job, its raw
KV record (`Raw`: the bytes and the next run time read from them without decoding the
rest). An initial load of 100,000 records then costs one look at each record, and the job
objects are built the first time each is looked up, listed or due: decoding all of them at
start would double the time to the first fire (bench/startup.py).

The order APScheduler's store contract reads (`due`, `next_run_time`, `all`: a
`MemoryJobStore`, the reference behaviour) is built the first time one of them is called,
from every job at once with one sort, and kept up to date from then on. nats-cron's own
scheduler never asks for it (the leader keeps its own agenda); a generic APScheduler
application asks at once.

The mirror also remembers the KV revision each copy came from, the records that could not
be loaded (`skipped`) and the job objects a newer version replaced (`stale`: an
APScheduler thread may still hold one and hand it back to `update_job`). The store holds its
lock around every call.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.util import datetime_to_utc_timestamp

#: A record's job, or why it cannot be loaded.
Decode = Callable[[str, bytes], "Job | str"]


@dataclass(frozen=True, slots=True)
class Raw:
    """A record not decoded yet."""

    value: bytes
    next_run_time: datetime | None


class Mirror:
    def __init__(self, decode: Decode | None = None) -> None:
        self._decode = decode
        self._jobs: dict[str, Job | Raw] = {}
        self._index: MemoryJobStore | None = None  # APScheduler's order, once asked for
        self.revisions: dict[str, int] = {}  #: job id -> revision of the copy held (or written)
        self.skipped: dict[str, str] = {}  #: job id -> why its record is not loaded
        # Every replaced job object, not only the latest per id: an executor may still
        # hold one from two versions ago. Keyed by id(): Job defines __eq__ without
        # __hash__; a dead object drops out, so an id() is never reused while listed.
        self._stale: weakref.WeakValueDictionary[int, Job] = weakref.WeakValueDictionary()

    # --- reads -----------------------------------------------------------------------------------

    def lookup(self, job_id: str) -> Job | None:
        entry = self._jobs.get(job_id)
        if type(entry) is Raw:
            return self._materialize(job_id, entry)
        return entry

    def due(self, now: Any) -> list[Job]:
        return self._ordered().get_due_jobs(now)  # type: ignore[no-any-return]

    def next_run_time(self) -> Any:
        return self._ordered().get_next_run_time()

    def all(self) -> list[Job]:
        return self._ordered().get_all_jobs()  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    def __iter__(self) -> Iterator[Job]:
        """Every job (all decoded first), in no particular order."""
        self._materialize_all()
        return iter([entry for entry in self._jobs.values() if type(entry) is not Raw])

    def records(self) -> Iterator[tuple[str, datetime | None, Job | None]]:
        """(id, next run time, the job if it is decoded) of every job, decoding nothing."""
        for job_id, entry in list(self._jobs.items()):
            if type(entry) is Raw:
                yield job_id, entry.next_run_time, None
            else:
                yield job_id, entry.next_run_time, entry

    def raw(self, job_id: str) -> bytes | None:
        entry = self._jobs.get(job_id)
        return entry.value if type(entry) is Raw else None

    def is_stale(self, job: Job) -> bool:
        return bool(self._stale) and self._stale.get(id(job)) is job

    # --- local changes (raise APScheduler's errors) -------------------------------------------

    def add(self, job: Job) -> None:
        if job.id in self.skipped or job.id in self._jobs:
            raise ConflictingIdError(job.id)
        self._jobs[job.id] = job
        if self._index is not None:
            self._index.add_job(job)
        self._stale.pop(id(job), None)  # re-added after a removal: current again

    def update(self, job: Job) -> None:
        """`MemoryJobStore.update_job`: replace the job of `job.id`."""
        old = self._jobs.get(job.id)
        if old is None:
            raise JobLookupError(job.id)
        self._jobs[job.id] = job
        if self._index is None:
            return
        if type(old) is Raw:
            self._index.add_job(job)
            return
        entry = self._index._jobs_index.get(job.id)
        if (
            entry is not None
            and entry[0] is job
            and entry[1] == datetime_to_utc_timestamp(job.next_run_time)
        ):
            return  # nothing the order depends on changed
        self._index.update_job(job)

    def remove(self, job_id: str) -> None:
        if self.skipped.pop(job_id, None) is not None:
            return
        old = self._jobs.pop(job_id, None)
        if old is None:
            raise JobLookupError(job_id)
        if self._index is not None and type(old) is not Raw:
            self._index.remove_job(job_id)

    def remove_all(self) -> list[str]:
        ids = list(self._jobs) + list(self.skipped)
        self._jobs.clear()
        if self._index is not None:
            self._index.remove_all_jobs()
        self.skipped.clear()
        self._stale.clear()
        return ids

    # --- what KV says -------------------------------------------------------------------------

    def replace(self, job_id: str, new: Job | Raw | None, skipped: str | None = None) -> None:
        """Make KV's version the local one: a job, a raw record, or nothing (deleted, or
        unreadable with the reason `skipped`)."""
        old = self._jobs.pop(job_id, None)
        if old is not None and type(old) is not Raw:
            self._stale[id(old)] = old
            if self._index is not None:
                self._index.remove_job(job_id)
        self.skipped.pop(job_id, None)
        if skipped is not None:
            self.skipped[job_id] = skipped
        elif new is not None:
            self._jobs[job_id] = new
            if self._index is not None and type(new) is not Raw:
                self._index.add_job(new)

    def forget(self, job_id: str, job: Job) -> None:
        """Take `job` (changed in place into a state that cannot be stored) out."""
        if self._jobs.get(job_id) is job:
            del self._jobs[job_id]
            if self._index is not None:
                self._index.remove_job(job_id)
            self._stale[id(job)] = job

    # --- decoding and ordering ------------------------------------------------------------------

    def _materialize(self, job_id: str, raw: Raw) -> Job | None:
        assert self._decode is not None, "a mirror holding raw records needs a decoder"
        result = self._decode(job_id, raw.value)
        if isinstance(result, str):
            del self._jobs[job_id]
            self.skipped[job_id] = result
            return None
        self._jobs[job_id] = result
        if self._index is not None:
            self._index.add_job(result)
        return result

    def _materialize_all(self) -> None:
        for job_id, entry in list(self._jobs.items()):
            if type(entry) is Raw:
                self._materialize(job_id, entry)

    def _ordered(self) -> MemoryJobStore:
        """APScheduler's order of every job, built on first use with one sort.

        `MemoryJobStore.add_job` costs a pure-Python bisection and a list insert per job,
        quadratic over 100,000 jobs in random next-run order. This builds the same structure
        (APScheduler 3's: a list of (job, timestamp) sorted by timestamp, None last, then id;
        and an id -> entry dict) in one go."""
        if self._index is None:
            self._materialize_all()
            index = MemoryJobStore()
            entries = [
                (job, datetime_to_utc_timestamp(job.next_run_time))
                for job in self._jobs.values()
                if not isinstance(job, Raw)
            ]
            entries.sort(key=lambda e: (math.inf if e[1] is None else e[1], e[0].id))
            index._jobs = entries
            index._jobs_index = {entry[0].id: entry for entry in entries}
            self._index = index
        return self._index
