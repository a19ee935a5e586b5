"""The leader's agenda: when each job fires next, derived from its trigger. Pure: `now` is a
parameter, no I/O, no asyncio.

APScheduler's triggers do the timing; the agenda holds, per job, the next slot to fire and
the moment it is due (the slot plus the job's jitter delay), in a heap ordered by that
moment. Nothing here is written to KV: a leader's firing progress is one progress mark
("every slot due up to T was handled"), and a new leader rebuilds the agenda from each
job's record and that mark (`Agenda.build`):

- a record written after the marking leader last read the bucket (`revision > applied`)
  starts at its own `next_run_time` (set when the schedule was created, changed, resumed
  or triggered);
- any other record's slots up to T were handled: a record whose `next_run_time` is later
  than T starts there, any other at its first slot after T (resolved lazily, when due).

`resolve()` then walks a due job's slots like APScheduler's scheduler with `coalesce=True`
and `misfire_grace_time`: the latest due slot fires (if it is not older than the grace
window), the older ones are skipped.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from apscheduler.job import Job
from apscheduler.triggers.base import BaseTrigger

from nats_apscheduler.cron import StandardCronTrigger
from nats_apscheduler.spec import EveryTrigger

_US = timedelta(microseconds=1)
#: A job's jitter delay of a slot, in seconds (0 without jitter).
Delay = Callable[[Job, datetime], float]


def after(trigger: BaseTrigger, moment: datetime) -> datetime | None:
    """The trigger's first slot strictly after `moment` (None: it never fires again)."""
    return trigger.get_next_fire_time(moment, moment + _US)  # type: ignore[no-any-return]


@dataclass(slots=True)
class Slots:
    """What `resolve()` found for one due job."""

    fire: datetime | None = None  #: the slot to fire now
    skipped: int = 0  #: due slots not fired (older than the fired one, or past grace)
    first_skipped: datetime | None = None
    last_skipped: datetime | None = None
    more_skipped: bool = False  #: slots before the grace window were not counted
    following: datetime | None = None  #: the next slot still to come (None: finished)


def resolve(
    trigger: BaseTrigger,
    start: datetime,
    now: datetime,
    grace: timedelta | None,
    floor: datetime | None = None,
    delay: Callable[[datetime], float] | None = None,
    max_delay: float = 0.0,
) -> Slots:
    """The slots of a job whose first unhandled slot is `start` (or its first slot after
    `floor`, when `start` is not later), as of `now`.

    A slot is due when `slot + delay(slot) <= now`. Slots older than `now - grace` are never
    fired; they are skipped without being walked one by one where the trigger allows a jump.
    """
    out = Slots()
    slot: datetime | None = start
    if floor is not None and start <= floor:
        slot = _first_after_floor(trigger, floor, delay, max_delay)
    if slot is None:
        return out
    if isinstance(trigger, EveryTrigger) and delay is None:
        return _resolve_every(trigger, slot, now, grace, out)
    window = now - grace if grace is not None else None
    if window is not None and slot < window:
        jumped = after(trigger, window - _US)  # the first slot at or after the window start
        out.more_skipped = True
        out.first_skipped = slot
        out.last_skipped = slot
        out.skipped = 1
        slot = jumped
    latest: datetime | None = None
    while slot is not None and slot <= now:
        if delay is not None and slot.timestamp() + delay(slot) > now.timestamp():
            break  # due by its slot, not yet by its jitter delay
        if latest is not None:
            _skip(out, latest)
        latest = slot
        slot = after(trigger, slot)
    out.following = slot
    if latest is None:
        return out
    if window is not None and latest < window:
        _skip(out, latest)  # the newest due slot is past its grace window too
        return out
    out.fire = latest
    return out


def _resolve_every(
    trigger: EveryTrigger, slot: datetime, now: datetime, grace: timedelta | None, out: Slots
) -> Slots:
    """`resolve` for a fixed interval without jitter: O(1), however many slots passed."""
    if slot > now:
        out.following = slot
        return out
    interval = trigger.interval
    steps = (now - slot) // interval
    latest = slot + steps * interval
    if trigger.end_date is not None and latest > trigger.end_date:
        steps = (trigger.end_date - slot) // interval
        latest = slot + steps * interval
    following = latest + interval
    out.following = following if trigger.end_date is None or following <= trigger.end_date else None
    if steps:
        out.skipped = steps
        out.first_skipped = slot
        out.last_skipped = latest - interval
    if grace is not None and now - latest > grace:
        out.skipped += 1
        out.first_skipped = out.first_skipped or latest
        out.last_skipped = latest
        return out
    out.fire = latest
    return out


def _skip(out: Slots, slot: datetime) -> None:
    out.skipped += 1
    if out.first_skipped is None:
        out.first_skipped = slot
    out.last_skipped = slot


def _first_after_floor(
    trigger: BaseTrigger,
    floor: datetime,
    delay: Callable[[datetime], float] | None,
    max_delay: float,
) -> datetime | None:
    """The first slot not handled by a leader that handled everything due up to `floor`.

    With jitter a slot is due at `slot + delay`: a slot up to `max_delay` before the floor
    may still be unhandled."""
    if delay is None or max_delay <= 0:
        return after(trigger, floor)
    slot = after(trigger, floor - timedelta(seconds=max_delay))
    while slot is not None and slot <= floor:
        if slot.timestamp() + delay(slot) > floor.timestamp():
            return slot
        slot = after(trigger, slot)
    return slot


@dataclass(frozen=True)
class Mark:
    """A leader's progress: every slot due up to `handled` of every job whose record it
    held as of the jobs stream's sequence `applied` was handled (fired or skipped)."""

    handled: datetime
    applied: int


class Entry:
    """One job on the agenda. `job` is None until the job's record is decoded (a new term
    builds its agenda from undecoded records; the term decodes a job when it is due)."""

    __slots__ = ("at", "floor", "job", "job_id", "n", "origin", "slot")

    def __init__(
        self,
        job_id: str,
        job: Job | None,
        origin: datetime,
        slot: datetime,
        at: float,
        floor: datetime | None,
    ) -> None:
        self.job_id = job_id
        self.job = job
        self.origin = origin  # the record's own next run time
        self.slot = slot  # the next slot to fire (or, with `floor`, where to start looking)
        self.at = at  # unix time it is due
        self.floor = floor
        self.n = 0  # tie-breaker of equal due times (push order)

    def __lt__(self, other: Entry) -> bool:
        # The heap holds the entries themselves, not (due, n, entry) tuples: a herd of
        # 100,000 jobs would otherwise leave 300,000 objects behind each slot for the
        # cyclic GC to walk (an entry is only changed while it is out of the heap).
        return (self.at, self.n) < (other.at, other.n)


#: (job id, the record's next run time, the job if decoded): what a new term starts from.
Record = tuple[str, datetime | None, Job | None]


class Agenda:
    """Due times of every scheduled job, in a heap (lazy deletion: stale heap items are
    skipped when popped)."""

    def __init__(self, delay: Delay | None = None) -> None:
        self._entries: dict[str, Entry] = {}
        self._heap: list[Entry] = []
        self._n = itertools.count()
        self._delay = delay

    # --- building and following the store --------------------------------------------------

    def build(
        self, records: Iterable[Record], mark: Mark | None, revision_of: Callable[[str], int]
    ) -> None:
        """The agenda of a new term, from each job's record and the last progress mark."""
        self._entries.clear()
        items: list[Entry] = []
        for job_id, origin, job in records:
            if origin is None:
                continue  # paused
            floor = None
            if mark is not None and origin <= mark.handled and revision_of(job_id) <= mark.applied:
                floor = mark.handled  # resolved when due: its origin is in the past
            at = origin.timestamp() + (self._delay_of(job, origin) if job is not None else 0.0)
            entry = Entry(job_id, job, origin, origin, at, floor)
            self._entries[job_id] = entry
            entry.n = next(self._n)
            items.append(entry)
        heapq.heapify(items)
        self._heap = items

    def changed(self, job_id: str, job: Job | None) -> bool:
        """Follow a change of a job's record; True if its due time moved."""
        old = self._entries.get(job_id)
        if job is None or job.next_run_time is None:
            return self._entries.pop(job_id, None) is not None
        if (
            old is not None
            and old.job is not None
            and old.origin == job.next_run_time
            and same_trigger(old.job.trigger, job.trigger)
        ):
            # Same schedule, same next run time in the record (a payload change, say): the
            # leader's own progress stands.
            old.job = job
            return False
        self.put(job, job.next_run_time)
        return True

    def put(self, job: Job, slot: datetime, floor: datetime | None = None) -> Entry:
        at = slot.timestamp() + self._delay_of(job, slot)
        entry = Entry(job.id, job, job.next_run_time or slot, slot, at, floor)
        self._entries[job.id] = entry
        entry.n = next(self._n)
        heapq.heappush(self._heap, entry)
        return entry

    def advance(self, entry: Entry, slot: datetime | None) -> None:
        """Move a popped entry to its next slot (None: the job is finished)."""
        if slot is None:
            if self._entries.get(entry.job_id) is entry:
                del self._entries[entry.job_id]
            return
        entry.slot = slot
        entry.floor = None
        entry.at = slot.timestamp() + (
            self._delay_of(entry.job, slot) if entry.job is not None else 0.0
        )
        if self._entries.get(entry.job_id) is entry:
            entry.n = next(self._n)
            heapq.heappush(self._heap, entry)

    def defer(self, entry: Entry, at: float) -> None:
        """Put a popped entry back, due at `at`, its slot not handled (it waited for room in
        flight: its slot is resolved when it is popped again)."""
        entry.at = at
        if self._entries.get(entry.job_id) is entry:
            entry.n = next(self._n)
            heapq.heappush(self._heap, entry)

    def holds(self, entry: Entry) -> bool:
        """True while `entry` is its job's entry (not replaced by a change, nor removed)."""
        return self._entries.get(entry.job_id) is entry

    def remove(self, job_id: str) -> None:
        self._entries.pop(job_id, None)

    # --- reads ---------------------------------------------------------------------------------

    def pop_due(self, now: float, limit: int) -> list[Entry]:
        """Up to `limit` entries due at `now`, earliest first (they leave the heap; put them
        back with `advance`)."""
        out: list[Entry] = []
        heap, entries = self._heap, self._entries
        while heap and len(out) < limit and heap[0].at <= now:
            entry = heapq.heappop(heap)
            if entries.get(entry.job_id) is entry:
                out.append(entry)
        return out

    def next_at(self) -> float | None:
        """Unix time of the earliest due entry (None: nothing scheduled)."""
        heap, entries = self._heap, self._entries
        while heap:
            entry = heap[0]
            if entries.get(entry.job_id) is entry:
                return entry.at
            heapq.heappop(heap)
        return None

    def next_slot(self, job_id: str, now: datetime) -> datetime | None:
        """The job's next slot as the leader sees it (for `get` and `list`)."""
        entry = self._entries.get(job_id)
        if entry is None:
            return None
        if entry.floor is not None and entry.slot <= entry.floor:
            if entry.job is None:
                return None  # known once the job is decoded (when it is due)
            return after(entry.job.trigger, entry.floor)
        return entry.slot

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def _delay_of(self, job: Job, slot: datetime) -> float:
        return self._delay(job, slot) if self._delay is not None else 0.0


def same_trigger(a: BaseTrigger, b: BaseTrigger) -> bool:
    """The same schedule (our triggers compare by their state; others only by identity)."""
    if a is b:
        return True
    if type(a) is not type(b) or not isinstance(a, EveryTrigger | StandardCronTrigger):
        return False
    return bool(a.__getstate__() == b.__getstate__())


def display_next(job: Job, now: datetime) -> datetime | None:
    """A job's next slot as a follower can tell it: its record's next run time while that is
    ahead, else the trigger's first slot after `now`."""
    origin: Any = job.next_run_time
    if origin is None or origin >= now:
        return origin  # type: ignore[no-any-return]
    return after(job.trigger, now)
