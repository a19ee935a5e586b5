"""Job documents to APScheduler jobs and back: the operations behind the API.

`JobManager` works on the scheduler and its store only (never on KV directly) and
returns plain dicts in the API's reply shapes. Every mutation waits until its KV write
has landed, so a reply of success means the change is durable and visible to the
leader.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.schedulers.base import BaseScheduler

from nats_apscheduler.errors import NatsCronError, SpecError, WriteConflict
from nats_apscheduler.fire import FIRE_REF, rfc3339
from nats_apscheduler.spec import JobSpec, parse_job, validate_subject
from nats_apscheduler.store import JetStreamJobStore

EXECUTOR = "nats"
JOBSTORE = "default"
_ATTEMPTS = 5
MAX_OVERLAP = 4  # fires of one job in flight at once
# Aliases: the method `JobManager.list` shadows the builtin inside the class.
Documents = list[dict[str, Any]]
Subjects = list[str]


class NotFound(NatsCronError):
    """No job with that subject."""


class Conflict(NatsCronError):
    """The job exists already, or another writer changed it concurrently."""


@dataclass(frozen=True)
class Limits:
    min_interval: timedelta = timedelta(seconds=1)
    max_payload: int | None = None
    grace: timedelta = timedelta(hours=1)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: `*` one token, `>` one or more trailing tokens."""
    p_tokens, s_tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(p_tokens):
        if token == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (token != "*" and token != s_tokens[i]):
            return False
    return len(p_tokens) == len(s_tokens)


def validate_pattern(pattern: str) -> str:
    if not pattern or pattern.strip() != pattern or " " in pattern:
        raise SpecError("pattern", "must be a non-empty subject pattern without spaces")
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if not token:
            raise SpecError("pattern", f"{pattern!r}: empty token")
        if token == ">" and i != len(tokens) - 1:
            raise SpecError("pattern", f"{pattern!r}: '>' must be the last token")
        if token not in ("*", ">") and ("*" in token or ">" in token):
            raise SpecError("pattern", f"{pattern!r}: wildcards must be whole tokens")
    return pattern


class JobManager:
    def __init__(self, scheduler: BaseScheduler, store: JetStreamJobStore, limits: Limits) -> None:
        self._scheduler = scheduler
        self._store = store
        self.limits = limits

    # --- reads ---------------------------------------------------------------------------

    def list(self) -> Documents:
        """Every job, in subject order (as the API's `list` pages them)."""
        return list(self.list_after(None))

    def list_after(self, after: str | None) -> Iterator[dict[str, Any]]:
        """The jobs in subject order, from the first subject after `after`, described
        lazily (a page of the API's list describes only what fits in its reply)."""
        jobs = sorted(self._store.get_all_jobs(), key=_subject_of)
        start = 0 if after is None else bisect.bisect_right(jobs, after, key=_subject_of)
        return (self.describe(job) for job in jobs[start:])

    def get(self, subject: str) -> dict[str, Any]:
        return self.describe(self._job(subject))

    def count(self) -> int:
        return len(self._store.get_all_jobs())

    def describe(self, job: Job) -> dict[str, Any]:
        doc = dict(job.kwargs.get("job") or {})
        state = job.kwargs.get("state") or {}
        doc["paused"] = job.next_run_time is None
        doc["next_run"] = rfc3339(job.next_run_time) if job.next_run_time else None
        doc["last_run"] = state.get("last_run")
        doc["last_scheduled"] = state.get("last_scheduled")
        doc["run_count"] = int(state.get("run_count") or 0)
        doc["last_error"] = state.get("last_error")
        return doc

    # --- writes --------------------------------------------------------------------------

    def parse(self, document: Any) -> JobSpec:
        return parse_job(
            document,
            min_interval=self.limits.min_interval,
            max_payload=self.limits.max_payload,
        )

    async def create(self, document: Any) -> JobSpec:
        spec = self.parse(document)
        now = datetime.now(UTC)
        try:
            self._scheduler.add_job(FIRE_REF, **self._job_args(spec, now, state={}))
        except ConflictingIdError:
            raise Conflict(f"job {spec.subject!r} exists already (use update)") from None
        try:
            await self._store.apersist(spec.subject)
        except WriteConflict:
            raise Conflict(f"job {spec.subject!r} was just created elsewhere") from None
        return spec

    async def update(self, document: Any) -> JobSpec:
        """Upsert. An unchanged schedule keeps its trigger and next run (and so its phase)."""
        spec = self.parse(document)
        await self._retrying(spec.subject, lambda: self._apply_update(spec))
        return spec

    def _apply_update(self, spec: JobSpec) -> None:
        now = datetime.now(UTC)
        existing = self._store.lookup_job(spec.subject)
        if existing is None:
            self._scheduler.add_job(FIRE_REF, **self._job_args(spec, now, state={}))
            return
        old_doc = existing.kwargs.get("job") or {}
        same_schedule = old_doc.get("schedule") == spec.to_document()["schedule"]
        args = self._job_args(spec, now, state=existing.kwargs.get("state") or {})
        changes: dict[str, Any] = {
            "kwargs": args["kwargs"],
            "misfire_grace_time": args["misfire_grace_time"],
        }
        if not same_schedule:
            changes["trigger"] = args["trigger"]
        if spec.paused:
            changes["next_run_time"] = None
        elif not same_schedule or existing.next_run_time is None:
            trigger = changes.get("trigger", existing.trigger)
            changes["next_run_time"] = trigger.get_next_fire_time(None, now)
        self._scheduler.modify_job(spec.subject, JOBSTORE, **changes)

    async def delete(self, subject: str) -> None:
        """Idempotent, as in the Go version."""
        validate_subject(subject, "subject")

        def remove() -> None:
            with contextlib.suppress(JobLookupError):
                self._store.remove_job(subject)

        await self._retrying(subject, remove)

    async def delete_pattern(self, pattern: str) -> Subjects:
        validate_pattern(pattern)
        ids = [job.id for job in self._store.get_all_jobs()] + list(self._store.skipped_records())
        matched = sorted(i for i in ids if subject_matches(pattern, i))
        for subject in matched:
            try:
                self._store.remove_job(subject)
            except JobLookupError:
                continue
        await self._store.aflush()
        return matched

    async def pause(self, subject: str) -> None:
        def pause() -> None:
            job = self._job(subject)
            doc = {**(job.kwargs.get("job") or {}), "paused": True}
            kwargs = {**job.kwargs, "job": doc}
            self._scheduler.modify_job(subject, JOBSTORE, next_run_time=None, kwargs=kwargs)

        await self._retrying(subject, pause)

    async def resume(self, subject: str) -> None:
        def resume() -> None:
            job = self._job(subject)
            doc = {**(job.kwargs.get("job") or {}), "paused": False}
            kwargs = {**job.kwargs, "job": doc}
            next_run = job.trigger.get_next_fire_time(None, datetime.now(UTC))
            self._scheduler.modify_job(subject, JOBSTORE, next_run_time=next_run, kwargs=kwargs)

        await self._retrying(subject, resume)

    async def trigger(self, subject: str) -> str:
        """Fire once now (by the leader), then carry on with the schedule."""
        now = datetime.now(UTC)

        def trigger() -> None:
            job = self._job(subject)
            if job.next_run_time is None:
                raise Conflict(f"job {subject!r} is paused; resume it first")
            self._scheduler.modify_job(subject, JOBSTORE, next_run_time=now)

        await self._retrying(subject, trigger)
        return rfc3339(now)

    # --- helpers -------------------------------------------------------------------------

    def _job(self, subject: str) -> Job:
        validate_subject(subject, "subject")
        job = self._store.lookup_job(subject)
        if job is None:
            raise NotFound(f"no job with subject {subject!r}")
        return job

    def _job_args(self, spec: JobSpec, now: datetime, state: dict[str, Any]) -> dict[str, Any]:
        grace = spec.grace if spec.grace is not None else self.limits.grace
        args: dict[str, Any] = {
            "trigger": spec.trigger(now),
            "id": spec.subject,
            "name": spec.subject,
            "executor": EXECUTOR,
            "jobstore": JOBSTORE,
            "kwargs": {"job": spec.to_document(), "state": state},
            "misfire_grace_time": max(1, int(grace.total_seconds())),
            "coalesce": True,
            # Slots of one job may overlap (a fire in its jitter delay, a late catch-up
            # right before the next slot): with 1, APScheduler would drop the next slot.
            "max_instances": MAX_OVERLAP,
            "replace_existing": False,
        }
        if spec.paused:
            args["next_run_time"] = None
        return args

    async def _retrying(self, subject: str, mutate: Callable[[], None]) -> None:
        """Apply `mutate` and wait for its KV write; on a lost compare-and-set (usually the
        leader recording a fire meanwhile) the store has reloaded the job: apply again."""
        for _ in range(_ATTEMPTS):
            mutate()
            try:
                await self._store.apersist(subject)
                return
            except WriteConflict:
                continue
        raise Conflict(f"job {subject!r} kept changing concurrently; retry")


def _subject_of(job: Job) -> str:
    return str(job.id)
