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

import asyncio
import bisect
import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.schedulers.base import BaseScheduler
from loguru import logger

from nats_apscheduler.agenda import display_next
from nats_apscheduler.cron import fire_times
from nats_apscheduler.errors import (
    Conflict,
    NotFound,
    SpecError,
    StoreError,
    WriteConflict,
)
from nats_apscheduler.fire import FIRE_REF, rfc3339
from nats_apscheduler.history import History, RunState
from nats_apscheduler.spec import JobSpec, parse_job, validate_subject
from nats_apscheduler.store import JetStreamJobStore

EXECUTOR = "nats"
JOBSTORE = "default"
_ATTEMPTS = 5
MAX_OVERLAP = 4  # fires of one job in flight at once (jitter delays may overlap a slot)
_APPLY_YIELD = 100  # documents validated between two yields to the loop (fires go on)
# Aliases: the method `JobManager.list` shadows the builtin inside the class.
Documents = list[dict[str, Any]]
Subjects = list[str]


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

    async def refresh(self, subjects: list[str] | None) -> None:
        """Make the run state of `subjects` (None: all) fresh enough to answer with."""


class RecordView:
    """A `RunView` from the records alone (no leader, no history)."""

    def next_run(self, job: Job, now: datetime) -> datetime | None:
        return display_next(job, now)

    def run_state(self, subject: str) -> RunState | None:
        return None

    async def refresh(self, subjects: list[str] | None) -> None:
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
        history: History | None = None,
    ) -> None:
        """`history`, when given, loses a job's records when the job is deleted."""
        self._scheduler = scheduler
        self._store = store
        self.limits = limits
        self.view: RunView = view or RecordView()
        self._history = history

    # --- reads ---------------------------------------------------------------------------

    def list(self) -> Documents:
        """Every job, in subject order (as the API's `list` pages them)."""
        return list(self.list_after(None))

    def list_after(self, after: str | None, pattern: str | None = None) -> Iterator[dict[str, Any]]:
        """The jobs in subject order, from the first subject after `after`, described
        lazily (a page of the API's list describes only what fits in its reply); only
        those matching the NATS wildcard `pattern` if one is given."""
        if pattern is not None:
            validate_pattern(pattern)
        jobs = sorted(self._store.jobs(), key=_subject_of)
        start = 0 if after is None else bisect.bisect_right(jobs, after, key=_subject_of)
        now = datetime.now(UTC)
        return (
            self.describe(job, now)
            for job in jobs[start:]
            if pattern is None or subject_matches(pattern, job.id)
        )

    def get(self, subject: str) -> dict[str, Any]:
        return self.describe(self._job(subject))

    async def refresh(self, subjects: Subjects | None = None) -> None:
        """Before answering `get`/`list`: the run state of `subjects` (None: all) as fresh as
        this instance can tell it (with shards, other leaders' jobs are read on demand)."""
        await self.view.refresh(subjects)

    def count(self) -> int:
        return self._store.count()

    def next_times(
        self, subject: str, count: int, now: datetime | None = None
    ) -> Sequence[datetime]:
        """The next `count` slots of the job's schedule after `now`, from its stored
        trigger (which holds an `every` job's phase), paused or not: for previews."""
        return fire_times(self._job(subject).trigger, now or datetime.now(UTC), count)

    def revision(self, subject: str) -> int:
        """The KV revision of the job's last stored change (0: no such job stored)."""
        return self._store.revision(subject)

    def exists(self, subject: str) -> bool:
        return (
            self._store.lookup_job(subject) is not None or subject in self._store.skipped_records()
        )

    def describe(self, job: Job, now: datetime | None = None) -> dict[str, Any]:
        doc = dict(job.kwargs.get("job") or {})
        subject = str(job.id)
        state = self.view.run_state(subject)
        nxt = self.view.next_run(job, now or datetime.now(UTC))
        # A paused job run once by `trigger(force=True)` has a next run until it fired.
        doc["paused"] = bool(doc.get("paused")) or job.next_run_time is None
        if doc["paused"]:
            forced = job.next_run_time
            nxt = forced if forced is not None and forced >= (now or datetime.now(UTC)) else None
        doc["next_run"] = rfc3339(nxt) if nxt else None
        doc["last_run"] = state.last_run if state else None
        doc["last_scheduled"] = state.last_scheduled if state else None
        doc["run_count"] = state.run_count if state else 0
        doc["last_error"] = state.last_error if state else None
        doc["last_outcome"] = state.last_outcome if state else None
        doc["last_success"] = state.last_success if state else None
        doc["consecutive_failures"] = state.consecutive_failures if state else 0
        doc["revision"] = self._store.revision(subject)
        return doc

    # --- writes --------------------------------------------------------------------------

    def parse(self, document: Any) -> JobSpec:
        """A new document, validated with every rule (`strict`) and this service's limits."""
        return parse_job(
            document,
            min_interval=self.limits.min_interval,
            max_payload=self.limits.max_payload,
            strict=True,
        )

    async def create(self, document: Any, *, dry_run: bool = False) -> JobSpec:
        spec = self.parse(document)
        now = datetime.now(UTC)
        if dry_run:
            if self.exists(spec.subject):
                raise Conflict(f"job {spec.subject!r} exists already (use update)")
            return spec
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
        spec, _ = await self.upsert(document)
        return spec

    async def upsert(
        self, document: Any, *, expected_revision: int | None = None, dry_run: bool = False
    ) -> tuple[JobSpec, bool]:
        """`update`, telling whether the job was created. With `expected_revision` the
        change is made only if the job's stored revision is that one (0: only if there is
        no such job), else `Conflict` (or `NotFound` if it was deleted): a concurrent
        change is never overwritten."""
        spec = self.parse(document)
        subject = spec.subject
        created = False

        def apply() -> None:
            nonlocal created
            self._check_revision(subject, expected_revision)
            created = self._store.lookup_job(subject) is None
            if not dry_run:
                self._apply_update(spec)

        if dry_run:
            apply()
        else:
            await self._retrying(subject, apply)
        return spec, created

    def _check_revision(self, subject: str, expected: int | None) -> None:
        if expected is None:
            return
        exists = self._store.lookup_job(subject) is not None
        if expected == 0:
            if exists:
                raise Conflict(
                    f"job {subject!r} exists (revision {self.revision(subject)}); "
                    "expected none (revision 0)"
                )
            return
        if not exists:
            raise NotFound(f"no job with subject {subject!r} (expected revision {expected})")
        current = self.revision(subject)
        if current != expected:
            raise Conflict(
                f"job {subject!r} changed: revision {current}, expected {expected}; "
                "read it again and retry"
            )

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

    async def delete(self, subject: str, *, dry_run: bool = False) -> bool:
        """Idempotent, as in the Go version; True if there was such a job. Its history
        goes with it."""
        validate_subject(subject, "subject")
        existed = self.exists(subject)
        if dry_run:
            return existed

        await self._retrying(subject, functools.partial(self._remove_quietly, subject))
        await self._purge_history(subject)
        return existed

    async def delete_pattern(self, pattern: str, *, dry_run: bool = False) -> Subjects:
        validate_pattern(pattern)
        ids = [job_id for job_id, _, _ in self._store.records()]
        ids += list(self._store.skipped_records())
        matched = sorted(i for i in ids if subject_matches(pattern, i))
        if dry_run:
            return matched
        for subject in matched:
            self._remove_quietly(subject)
        self._wakeup()
        await self._store.aflush()
        await self._purge_history(pattern)
        return matched

    async def _purge_history(self, subject_or_pattern: str) -> None:
        if self._history is None:
            return
        try:
            await self._history.purge(subject_or_pattern)
        except Exception as exc:  # the job is gone; its old runs stay visible
            logger.bind(subject=subject_or_pattern).warning(
                "could not purge the history of a deleted job: {}", exc
            )

    async def pause(self, subject: str, *, dry_run: bool = False) -> None:
        if dry_run:
            self._job(subject)
            return

        def pause() -> None:
            job = self._job(subject)
            self._replace(job, {**_doc(job), "paused": True}, None)

        await self._retrying(subject, pause)

    async def resume(self, subject: str, *, dry_run: bool = False) -> None:
        if dry_run:
            self._job(subject)
            return

        def resume() -> None:
            job = self._job(subject)
            self._replace(job, {**_doc(job), "paused": False}, _first(job.trigger, _now(), False))

        await self._retrying(subject, resume)

    async def trigger(self, subject: str, *, force: bool = False, dry_run: bool = False) -> str:
        """Fire once now (by the leader), then carry on with the schedule. A paused job
        is refused unless `force`: then it fires once and stays paused (its record keeps
        `paused: true` with a next run time: the leader fires that one slot only)."""
        now = datetime.now(UTC)

        def trigger() -> None:
            job = self._job(subject)
            paused = job.next_run_time is None or bool(_doc(job).get("paused"))
            if paused and not force:
                raise Conflict(
                    f"job {subject!r} is paused; resume it first, or force one run (--force)"
                )
            if not dry_run:
                self._replace(job, _doc(job), now)

        if dry_run:
            trigger()
        else:
            await self._retrying(subject, trigger)
        return rfc3339(now)

    async def apply(
        self, documents: Sequence[Any], deletes: Sequence[str], *, dry_run: bool = False
    ) -> Documents:
        """Make each document the job of its subject, and delete `deletes`: one result
        per item, in order, `{"subject", "action"}` with action `created`, `changed`,
        `unchanged`, `deleted`, `absent` (nothing to delete) or `invalid`/`failed` (with
        `error`). The writes are pipelined; a job whose document is stored already as
        given is not written at all (applying a file twice changes nothing)."""
        results: Documents = []
        writes: dict[str, Callable[[], None]] = {}
        seen: set[str] = set()
        for i, document in enumerate(documents):
            if i % _APPLY_YIELD == _APPLY_YIELD - 1:
                await asyncio.sleep(0)  # a large batch must not stall the fires
            try:
                spec = self.parse(document)
                if spec.subject in seen:
                    raise SpecError("target.subject", f"{spec.subject!r} is given twice")
            except SpecError as exc:
                results.append(
                    {"subject": _subject_in(document), "action": "invalid", "error": str(exc)}
                )
                continue
            seen.add(spec.subject)
            existing = self._store.lookup_job(spec.subject)
            if existing is None:
                action = "created"
            elif existing.kwargs.get("job") == spec.to_document():
                action = "unchanged"
            else:
                action = "changed"
            results.append({"subject": spec.subject, "action": action})
            if action != "unchanged":
                writes[spec.subject] = functools.partial(self._apply_update, spec)
        removed: Subjects = []
        for subject in deletes:
            try:
                validate_subject(subject, "delete")
                if subject in seen:
                    raise SpecError("delete", f"{subject!r} is also applied")
            except SpecError as exc:
                results.append({"subject": subject, "action": "invalid", "error": str(exc)})
                continue
            seen.add(subject)
            if not self.exists(subject):
                results.append({"subject": subject, "action": "absent"})
                continue
            results.append({"subject": subject, "action": "deleted"})
            writes[subject] = functools.partial(self._remove_quietly, subject)
            removed.append(subject)
        if dry_run or not writes:
            return results
        failures = await self._write_many(writes)
        for result in results:
            error = failures.get(result["subject"])
            if error is not None and result["action"] not in ("invalid", "absent"):
                result.update(action="failed", error=error)
        if self._history is not None:
            await asyncio.gather(*(self._purge_history(s) for s in removed if s not in failures))
        return results

    def _remove_quietly(self, subject: str) -> None:
        with contextlib.suppress(JobLookupError):
            self._store.remove_job(subject)

    async def _write_many(self, mutations: dict[str, Callable[[], None]]) -> dict[str, str]:
        """Apply every mutation, then wait for all their KV writes at once (the store
        pipelines them); re-apply those that lost a compare-and-set race. Returns the
        subjects that could not be written, with why."""
        pending = dict(mutations)
        failures: dict[str, str] = {}
        for _ in range(_ATTEMPTS):
            for subject, mutate in list(pending.items()):
                try:
                    mutate()
                except (SpecError, ConflictingIdError, ValueError) as exc:
                    failures[subject] = str(exc)
                    del pending[subject]
            self._wakeup()
            outcomes = await asyncio.gather(
                *(self._store.apersist(s) for s in pending), return_exceptions=True
            )
            retry: dict[str, Callable[[], None]] = {}
            for (subject, mutate), outcome in zip(pending.items(), outcomes, strict=True):
                if isinstance(outcome, WriteConflict):
                    retry[subject] = mutate
                elif isinstance(outcome, StoreError | TimeoutError):
                    failures[subject] = f"storage unavailable: {outcome}"
                elif isinstance(outcome, BaseException):
                    raise outcome
            pending = retry
            if not pending:
                break
        for subject in pending:
            failures[subject] = f"job {subject!r} kept changing concurrently; retry"
        return failures

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


def _subject_in(document: Any) -> str | None:
    """The subject a (possibly invalid) document names, for error reports."""
    if isinstance(document, dict):
        target = document.get("target")
        if isinstance(target, dict) and isinstance(target.get("subject"), str):
            return str(target["subject"])
        if isinstance(document.get("subject"), str):
            return str(document["subject"])
    return None
