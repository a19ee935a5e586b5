"""`Mirror`: the job store's in-memory copy of the jobs bucket. Pure: no asyncio, no NATS.

It answers every read of APScheduler's store contract (through an APScheduler
`MemoryJobStore`, the reference behaviour) and remembers, per job, the KV revision its
copy came from, the records that could not be loaded (`skipped`) and the job objects a
newer version replaced (`stale`: an APScheduler thread may still hold one and hand it
back to `update_job`). The store holds its lock around every call.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.util import datetime_to_utc_timestamp


class Mirror:
    def __init__(self) -> None:
        self._index = MemoryJobStore()
        self.revisions: dict[str, int] = {}  #: job id -> revision of the copy held (or written)
        self.skipped: dict[str, str] = {}  #: job id -> why its record is not loaded
        # Every replaced job object, not only the latest per id: an executor may still
        # hold one from two versions ago. Keyed by id(): Job defines __eq__ without
        # __hash__; a dead object drops out, so an id() is never reused while listed.
        self._stale: weakref.WeakValueDictionary[int, Job] = weakref.WeakValueDictionary()
        self._bulk: dict[str, Job] | None = None

    # --- reads (APScheduler's contract) -------------------------------------------------------

    def lookup(self, job_id: str) -> Job | None:
        if self._bulk is not None and job_id in self._bulk:
            return self._bulk[job_id]
        return self._index.lookup_job(job_id)

    def due(self, now: Any) -> list[Job]:
        return self._index.get_due_jobs(now)  # type: ignore[no-any-return]

    def next_run_time(self) -> Any:
        return self._index.get_next_run_time()

    def all(self) -> list[Job]:
        return self._index.get_all_jobs()  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return len(self._index._jobs_index)

    def __iter__(self) -> Iterator[Job]:
        """Every job, in no particular order (cheaper than `all()`)."""
        return (entry[0] for entry in self._index._jobs_index.values())

    def is_stale(self, job: Job) -> bool:
        return bool(self._stale) and self._stale.get(id(job)) is job

    # --- local changes (raise APScheduler's errors) -------------------------------------------

    def add(self, job: Job) -> None:
        if job.id in self.skipped:
            raise ConflictingIdError(job.id)
        self._index.add_job(job)  # ConflictingIdError if present
        self._stale.pop(id(job), None)  # re-added after a removal: current again

    def update(self, job: Job) -> None:
        """`MemoryJobStore.update_job`, skipped when it would change nothing."""
        entry = self._index._jobs_index.get(job.id)
        if (
            entry is not None
            and entry[0] is job
            and entry[1] == datetime_to_utc_timestamp(job.next_run_time)
        ):
            return
        self._index.update_job(job)  # JobLookupError if absent

    def remove(self, job_id: str) -> None:
        if self.skipped.pop(job_id, None) is None:
            self._index.remove_job(job_id)  # JobLookupError if absent

    def remove_all(self) -> list[str]:
        ids = [job.id for job in self._index.get_all_jobs()] + list(self.skipped)
        self._index.remove_all_jobs()
        self.skipped.clear()
        self._stale.clear()
        return ids

    # --- what KV says -------------------------------------------------------------------------

    def replace(self, job_id: str, job: Job | None, skipped: str | None = None) -> Job | None:
        """Make KV's version the local one: `job`, or nothing (deleted, or unreadable with the
        reason `skipped`). Returns the job object it replaced."""
        old = self._bulk.pop(job_id, None) if self._bulk is not None else None
        if old is None:
            old = self._index.lookup_job(job_id)
            if old is not None:
                self._index.remove_job(job_id)
        if old is not None:
            self._stale[id(old)] = old
        self.skipped.pop(job_id, None)
        if skipped is not None:
            self.skipped[job_id] = skipped
        elif job is not None:
            if self._bulk is not None:
                self._bulk[job_id] = job
            else:
                self._index.add_job(job)
        return old

    def forget(self, job_id: str, job: Job) -> None:
        """Take `job` (changed in place into a state that cannot be stored) out of the index."""
        if self._index.lookup_job(job_id) is job:
            self._index.remove_job(job_id)
            self._stale[id(job)] = job

    # --- the initial load ---------------------------------------------------------------------

    def begin_bulk(self) -> None:
        """Collect the jobs of an initial load; `end_bulk()` indexes them with one sort."""
        self._bulk = {}

    def end_bulk(self) -> None:
        """`MemoryJobStore.add_job` costs a pure-Python bisection and a list insert per job,
        quadratic over a load of 100,000 jobs in random next-run order. This builds the same
        structure (APScheduler 3's: a list of (job, timestamp) sorted by timestamp, None
        last, then id; and an id -> entry dict) in one go."""
        jobs, self._bulk = self._bulk or {}, None
        entries = list(self._index._jobs)
        entries.extend((job, datetime_to_utc_timestamp(job.next_run_time)) for job in jobs.values())
        entries.sort(key=lambda e: (math.inf if e[1] is None else e[1], e[0].id))
        self._index._jobs = entries
        self._index._jobs_index = {entry[0].id: entry for entry in entries}
