"""Retries of failed runs (SPEC §10): each run's next attempt, on a timer in the leader's
memory and persisted in the leader bucket, so that the next leader continues it.

Per job, one key `retry.<job subject>` of the leader bucket holds every run of the job that
has a further attempt to make: `{"subject", "runs": [{"scheduled", "slot_ms", "attempt",
"due", "due_ms", "caught_up"}], "epoch", "instance"}`. It is written when an attempt fails
with attempts left (the natural moment: nothing is written for runs that succeed, nor for
publish-mode jobs), kept while the next attempt is in flight, and deleted once the job has
no such run left (an attempt succeeded, or the last one went to the dead letter subject).

A new leader of a shard reads the keys of that shard's jobs before it fires
(`load()`), and sends each run's next attempt when it is due (at once if overdue). An
attempt that was in flight at the previous leader is therefore sent again: at least once
per attempt. The writes are compare-and-set on the revision this instance read or wrote
(pipelined through `KVWrites`), only while the fence holds; one job's changes coalesce.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
import nats.js.errors
from loguru import logger
from nats.aio.client import Client
from nats.js.kv import KeyValue

from nats_apscheduler._kvwrite import KVWrites
from nats_apscheduler._tasks import cancel_and_wait
from nats_apscheduler._watch import KVFeed
from nats_apscheduler.protocol import KV_DEL, KV_PURGE

RETRY_PREFIX = "retry"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_WRITE_ROUNDS = 3  # a job's record is written again at most this often after a conflict


def retry_key(subject: str) -> str:
    return f"{RETRY_PREFIX}.{subject}"


def _ms(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(milliseconds=1)


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Pending:
    """One run's next attempt."""

    subject: str
    slot: datetime
    attempt: int  #: the number of the attempt to make (2 for the first retry)
    due: datetime
    caught_up: bool = False
    sent: bool = False  #: in flight (stays recorded until it settles)
    n: int = field(default=0, compare=False)  # heap tie-breaker

    def __lt__(self, other: Pending) -> bool:
        return (self.due, self.n) < (other.due, other.n)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheduled": _rfc3339(self.slot),
            "slot_ms": _ms(self.slot),
            "attempt": self.attempt,
            "due": _rfc3339(self.due),
            "due_ms": _ms(self.due),
            "caught_up": self.caught_up,
        }


def decode(subject: str, data: bytes | None) -> list[Pending]:
    """The runs of a stored record (an unreadable one is logged and counts as none)."""
    try:
        value = json.loads(data or b"")
        runs = value["runs"]
        return [
            Pending(
                subject,
                _EPOCH + timedelta(milliseconds=int(run["slot_ms"])),
                int(run["attempt"]),
                _EPOCH + timedelta(milliseconds=int(run["due_ms"])),
                bool(run.get("caught_up")),
            )
            for run in runs
        ]
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        logger.bind(subject=subject).warning("ignoring an unreadable retry record: {}", exc)
        return []


class Retries:
    """The runs with a further attempt of the jobs one term fires (one shard's)."""

    def __init__(
        self,
        nc: Client,
        bucket: str,
        writes: KVWrites,
        fence: Callable[[], bool],
        owns: Callable[[str], bool] = lambda subject: True,
        epoch: int = 0,
        instance_id: str = "",
    ) -> None:
        self._nc = nc
        self.bucket = bucket
        self._writes = writes
        self._fence = fence
        self._owns = owns
        self.epoch = epoch
        self.instance_id = instance_id
        #: Called with the runs whose next attempt is due (the term sends them).
        self.on_due: Callable[[list[Pending]], None] = lambda due: None
        self._runs: dict[str, dict[int, Pending]] = {}  # subject -> slot ms -> its next attempt
        self._revisions: dict[str, int] = {}  # subject -> revision of its key (0: none)
        self._heap: list[Pending] = []
        self._n = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer: asyncio.Task[None] | None = None
        self._stopped = False
        self.writes = 0  #: records written or deleted

    # --- lifecycle ---------------------------------------------------------------------------

    async def load(self, timeout: float) -> bool:
        """Read the records of this term's jobs (False: not all in time; those read count)."""
        loaded = asyncio.get_running_loop().create_future()
        prefix_len = len(RETRY_PREFIX) + 1

        def handle(entry: KeyValue.Entry | None) -> None:
            if entry is None:
                if not loaded.done():
                    loaded.set_result(None)
                return
            subject = entry.key[prefix_len:]
            if not self._owns(subject):
                return
            self._revisions[subject] = int(entry.revision or 0)
            if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                self._runs.pop(subject, None)
                return
            runs = decode(subject, entry.value)
            self._runs[subject] = {_ms(p.slot): p for p in runs}

        feed = KVFeed(self._nc, self.bucket, f"{RETRY_PREFIX}.>", handler=handle)
        try:
            await feed.start()
            await asyncio.wait_for(loaded, timeout)
            ok = True
        except (TimeoutError, nats.errors.Error) as exc:
            logger.warning("reading the retry records: {}", str(exc) or type(exc).__name__)
            ok = False
        finally:
            with contextlib.suppress(nats.errors.Error, OSError):
                await feed.stop()
        for runs in self._runs.values():
            for pending in runs.values():
                self._push(pending)
        return ok

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write_loop(), name="retry-records")
        self._arm()

    def pending(self) -> list[Pending]:
        """Every run with a further attempt (loaded or scheduled)."""
        return [p for runs in self._runs.values() for p in runs.values()]

    async def flush(self, timeout: float) -> bool:
        """Wait until the records reflect every change so far (a clean end of the term)."""
        if not self._dirty and self._idle.is_set():
            return True
        self._wake.set()
        try:
            await asyncio.wait_for(self._settled(), timeout)
            return True
        except TimeoutError:
            return False

    async def _settled(self) -> None:
        while self._dirty or not self._idle.is_set():
            await self._idle.wait()
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self.halt()
        await cancel_and_wait([self._writer])

    def halt(self) -> None:
        """Stop at once (the lease is lost: what is stored is what the next leader gets)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is not None:
            self._writer.cancel()

    # --- the term's side --------------------------------------------------------------------

    def schedule(
        self, subject: str, slot: datetime, attempt: int, due: datetime, caught_up: bool
    ) -> None:
        """Attempt `attempt` of the run of `subject`'s `slot` is due at `due`."""
        if self._stopped:
            return
        pending = Pending(subject, slot, attempt, due, caught_up)
        self._runs.setdefault(subject, {})[_ms(slot)] = pending
        self._push(pending)
        self._changed(subject)

    def done(self, subject: str, slot: datetime) -> None:
        """The run of `subject`'s `slot` has no further attempt."""
        runs = self._runs.get(subject)
        if runs is None or runs.pop(_ms(slot), None) is None:
            return
        if not runs:
            del self._runs[subject]
        self._changed(subject)

    def defer(self, pending: Pending, seconds: float) -> None:
        """Try a due attempt again a little later (no room in flight, say)."""
        if self._current(pending):
            pending.sent = False
            pending.due = datetime.now(UTC) + timedelta(seconds=seconds)
            self._push(pending)  # the record keeps the first due time: it is overdue anyway

    def _current(self, pending: Pending) -> bool:
        runs = self._runs.get(pending.subject)
        return runs is not None and runs.get(_ms(pending.slot)) is pending

    # --- the timer -------------------------------------------------------------------------

    def _push(self, pending: Pending) -> None:
        pending.n = next(self._n)
        heapq.heappush(self._heap, pending)
        if self._writer is not None and self._heap[0] is pending:  # started, and earliest
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stopped:
            return
        while self._heap and (self._heap[0].sent or not self._current(self._heap[0])):
            heapq.heappop(self._heap)  # stale: sent, replaced or done
        if not self._heap:
            return
        wait = max(0.0, (self._heap[0].due - datetime.now(UTC)).total_seconds())
        self._timer = asyncio.get_running_loop().call_later(wait, self._fire_due)

    def _fire_due(self) -> None:
        self._timer = None
        now = datetime.now(UTC)
        due: list[Pending] = []
        while self._heap and self._heap[0].due <= now:
            pending = heapq.heappop(self._heap)
            if pending.sent or not self._current(pending):
                continue
            pending.sent = True
            due.append(pending)
        if due:
            try:
                self.on_due(due)
            except Exception as exc:  # the timer must keep going
                logger.opt(exception=exc).error("sending retries failed: {}", exc)
        self._arm()

    # --- the records ---------------------------------------------------------------------------

    def _changed(self, subject: str) -> None:
        self._dirty.add(subject)
        self._wake.set()

    def _value(self, subject: str) -> bytes | None:
        runs = self._runs.get(subject)
        if not runs:
            return None
        return json.dumps(
            {
                "subject": subject,
                "runs": [p.to_dict() for p in sorted(runs.values())],
                "epoch": self.epoch,
                "instance": self.instance_id,
            },
            separators=(",", ":"),
        ).encode()

    async def _write_loop(self) -> None:
        rounds: dict[str, int] = {}
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._dirty:
                continue
            self._idle.clear()
            try:
                if not self._fence():
                    self._dirty.clear()  # deposed: the next leader reads what is stored
                    continue
                subjects = sorted(self._dirty)
                self._dirty.clear()
                writes = []
                for subject in subjects:
                    value = self._value(subject)
                    revision = self._revisions.get(subject, 0)
                    if value is None and revision == 0:
                        continue  # nothing stored, nothing to store
                    writes.append((subject, value, revision))
                outcomes = await self._writes.send([(retry_key(s), v, r) for s, v, r in writes])
                for (subject, _, _), outcome in zip(writes, outcomes, strict=True):
                    if isinstance(outcome, int):
                        self._revisions[subject] = outcome
                        self.writes += 1
                        rounds.pop(subject, None)
                        continue
                    n = rounds[subject] = rounds.get(subject, 0) + 1
                    if n > _WRITE_ROUNDS:
                        rounds.pop(subject, None)
                        logger.bind(subject=subject).warning(
                            "could not store the retry record (the attempts go on here): {}",
                            str(outcome) or type(outcome).__name__,
                        )
                        continue
                    if isinstance(outcome, nats.js.errors.KeyWrongLastSequenceError):
                        await self._reread(subject)
                    self._dirty.add(subject)
                    self._wake.set()
            finally:
                self._idle.set()

    async def _reread(self, subject: str) -> None:
        """The record changed under us (a late write of the previous leader): take its
        revision; our own state of the job's runs is written over it."""
        try:
            msg = await self._nc.jetstream().get_msg(
                f"KV_{self.bucket}", subject=f"$KV.{self.bucket}.{retry_key(subject)}", direct=False
            )
            self._revisions[subject] = int(msg.seq or 0)
        except nats.js.errors.NotFoundError:
            self._revisions[subject] = 0
        except (nats.errors.Error, TimeoutError) as exc:
            logger.bind(subject=subject).debug("re-reading a retry record: {}", exc)
