"""Job documents to APScheduler jobs and back: the operations behind the API.

`JobManager` works on the job store (never on KV directly) and returns plain dicts in the
API's reply shapes. Every mutation waits until its KV write has landed, so a reply of
success means the change is durable and visible to the leader.

A job's record holds its definition and its `next_run_time` as of the last change of its
schedule: set when the job is created, its schedule changes, it is resumed or triggered,
and left alone by every other change (a payload edit keeps the leader's progress and the
schedule's phase). Firing never writes the record; `describe()` reports the run state of
the history (`RunView`).
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.schedulers.base import BaseScheduler

from nats_apscheduler.agenda import display_next
from nats_apscheduler.errors import NatsCronError, SpecError, WriteConflict
from nats_apscheduler.fire import FIRE_REF, rfc3339
from nats_apscheduler.history import RunState
from nats_apscheduler.spec import JobSpec, parse_job, validate_subject
from nats_apscheduler.store import JetStreamJobStore

EXECUTOR = "nats"
JOBSTORE = "default"
_ATTEMPTS = 5
MAX_OVERLAP = 4  # fires of one job in flight at once (jitter delays may overlap a slot)
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


class RunView(Protocol):
    """What the instance knows of a job beyond its record: when it fires next and how its
    runs went."""

    def next_run(self, job: Job, now: datetime) -> datetime | None: ...

    def run_state(self, subject: str) -> RunState | None: ...


class RecordView:
    """A `RunView` from the records alone (no leader, no history)."""

    def next_run(self, job: Job, now: datetime) -> datetime | None:
        return display_next(job, now)

    def run_state(self, subject: str) -> RunState | None:
        return None


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
    def __init__(
        self,
        scheduler: BaseScheduler,
        store: JetStreamJobStore,
        limits: Limits,
        view: RunView | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._store = store
        self.limits = limits
        self.view: RunView = view or RecordView()

    # --- reads ---------------------------------------------------------------------------

    def list(self) -> Documents:
        """Every job, in subject order (as the API's `list` pages them)."""
        return list(self.list_after(None))

    def list_after(self, after: str | None) -> Iterator[dict[str, Any]]:
        """The jobs in subject order, from the first subject after `after`, described
        lazily (a page of the API's list describes only what fits in its reply)."""
        jobs = sorted(self._store.jobs(), key=_subject_of)
        start = 0 if after is None else bisect.bisect_right(jobs, after, key=_subject_of)
        now = datetime.now(UTC)
        return (self.describe(job, now) for job in jobs[start:])

    def get(self, subject: str) -> dict[str, Any]:
        return self.describe(self._job(subject))

    def count(self) -> int:
        return self._store.count()

    def describe(self, job: Job, now: datetime | None = None) -> dict[str, Any]:
        doc = dict(job.kwargs.get("job") or {})
        subject = str(job.id)
        state = self.view.run_state(subject)
        nxt = self.view.next_run(job, now or datetime.now(UTC))
        doc["paused"] = job.next_run_time is None
        doc["next_run"] = rfc3339(nxt) if nxt else None
        doc["last_run"] = state.last_run if state else None
        doc["last_scheduled"] = state.last_scheduled if state else None
        doc["run_count"] = state.run_count if state else 0
        doc["last_error"] = state.last_error if state else None
        doc["last_outcome"] = state.last_outcome if state else None
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
        trigger = spec.trigger(now)
        job = self._new_job(spec, trigger, _first(trigger, now, spec.paused))
        try:
            self._store.add_job(job)
        except ConflictingIdError:
            raise Conflict(f"job {spec.subject!r} exists already (use update)") from None
        self._wakeup()
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
            trigger = spec.trigger(now)
            self._store.add_job(self._new_job(spec, trigger, _first(trigger, now, spec.paused)))
            return
        old_doc = existing.kwargs.get("job") or {}
        same_schedule = old_doc.get("schedule") == spec.to_document()["schedule"]
        trigger = existing.trigger if same_schedule else spec.trigger(now)
        if spec.paused:
            next_run = None
        elif same_schedule and existing.next_run_time is not None:
            next_run = existing.next_run_time  # the leader's progress on it stands
        else:
            next_run = _first(trigger, now, False)
        self._store.update_job(self._new_job(spec, trigger, next_run))

    async def delete(self, subject: str) -> None:
        """Idempotent, as in the Go version."""
        validate_subject(subject, "subject")

        def remove() -> None:
            with contextlib.suppress(JobLookupError):
                self._store.remove_job(subject)

        await self._retrying(subject, remove)

    async def delete_pattern(self, pattern: str) -> Subjects:
        validate_pattern(pattern)
        ids = [job.id for job in self._store.jobs()] + list(self._store.skipped_records())
        matched = sorted(i for i in ids if subject_matches(pattern, i))
        for subject in matched:
            try:
                self._store.remove_job(subject)
            except JobLookupError:
                continue
        self._wakeup()
        await self._store.aflush()
        return matched

    async def pause(self, subject: str) -> None:
        def pause() -> None:
            job = self._job(subject)
            self._replace(job, {**_doc(job), "paused": True}, None)

        await self._retrying(subject, pause)

    async def resume(self, subject: str) -> None:
        def resume() -> None:
            job = self._job(subject)
            self._replace(job, {**_doc(job), "paused": False}, _first(job.trigger, _now(), False))

        await self._retrying(subject, resume)

    async def trigger(self, subject: str) -> str:
        """Fire once now (by the leader), then carry on with the schedule."""
        now = datetime.now(UTC)

        def trigger() -> None:
            job = self._job(subject)
            if job.next_run_time is None:
                raise Conflict(f"job {subject!r} is paused; resume it first")
            self._replace(job, _doc(job), now)

        await self._retrying(subject, trigger)
        return rfc3339(now)

    # --- helpers -------------------------------------------------------------------------

    def _job(self, subject: str) -> Job:
        validate_subject(subject, "subject")
        job = self._store.lookup_job(subject)
        if job is None:
            raise NotFound(f"no job with subject {subject!r}")
        return job

    def _new_job(self, spec: JobSpec, trigger: Any, next_run: datetime | None) -> Job:
        grace = spec.grace if spec.grace is not None else self.limits.grace
        return Job(
            self._scheduler,
            id=spec.subject,
            func=FIRE_REF,
            trigger=trigger,
            executor=EXECUTOR,
            args=(),
            kwargs={"job": spec.to_document()},
            name=spec.subject,
            misfire_grace_time=max(1, int(grace.total_seconds())),
            coalesce=True,
            max_instances=MAX_OVERLAP,
            next_run_time=next_run,
        )

    def _replace(self, job: Job, document: dict[str, Any], next_run: datetime | None) -> None:
        """Store a copy of `job` with another document and next run time."""
        state = job.__getstate__()
        state["kwargs"] = {**job.kwargs, "job": document}
        state["next_run_time"] = next_run
        copy = Job.__new__(Job)
        copy.__setstate__(state)
        copy._scheduler = self._scheduler
        copy.func = job.func
        self._store.update_job(copy)

    def _wakeup(self) -> None:
        if self._scheduler.running:
            self._scheduler.wakeup()

    async def _retrying(self, subject: str, mutate: Callable[[], None]) -> None:
        """Apply `mutate` and wait for its KV write; on a lost compare-and-set (another
        writer changed the job meanwhile) the store has reloaded the job: apply again."""
        for _ in range(_ATTEMPTS):
            mutate()
            self._wakeup()
            try:
                await self._store.apersist(subject)
                return
            except WriteConflict:
                continue
        raise Conflict(f"job {subject!r} kept changing concurrently; retry")


def _first(trigger: Any, now: datetime, paused: bool) -> datetime | None:
    next_run: datetime | None = None if paused else trigger.get_next_fire_time(None, now)
    return next_run


def _doc(job: Job) -> dict[str, Any]:
    return dict(job.kwargs.get("job") or {})


def _now() -> datetime:
    return datetime.now(UTC)


def _subject_of(job: Job) -> str:
    return str(job.id)
