"""The leader's agenda, pure: slot resolution (coalescing, grace, floors, jitter) and the
rebuild of a term's agenda from job records and a progress mark."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from hypothesis import given, settings
from hypothesis import strategies as st

from nats_apscheduler.agenda import Agenda, Mark, after, display_next, resolve
from nats_apscheduler.cron import StandardCronTrigger
from nats_apscheduler.spec import EveryTrigger

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)
M = timedelta(minutes=1)
SCHEDULER = BackgroundScheduler(timezone=UTC)


def job(job_id: str, trigger: Any, next_run: datetime | None) -> Job:
    return Job(
        SCHEDULER,
        id=job_id,
        func="builtins:print",
        trigger=trigger,
        executor="nats",
        args=(),
        kwargs={},
        name=job_id,
        misfire_grace_time=60,
        coalesce=True,
        max_instances=1,
        next_run_time=next_run,
    )


def records(*jobs: Job) -> list[tuple[str, datetime | None, Job | None]]:
    return [(j.id, j.next_run_time, j) for j in jobs]


def every(seconds: float, anchor: datetime = T0) -> EveryTrigger:
    return EveryTrigger(timedelta(seconds=seconds), anchor)


# --- resolve ----------------------------------------------------------------------------------


def test_one_due_slot_fires_and_the_next_follows() -> None:
    slots = resolve(every(10), T0, T0 + 2 * S, timedelta(minutes=1))
    assert slots.fire == T0 and slots.skipped == 0 and slots.following == T0 + 10 * S


def test_not_yet_due() -> None:
    slots = resolve(every(10), T0 + 10 * S, T0 + 2 * S, None)
    assert slots.fire is None and slots.following == T0 + 10 * S and slots.skipped == 0


@pytest.mark.parametrize("trigger", [every(1), StandardCronTrigger("* * * * * *", UTC)])
def test_an_outage_fires_the_latest_slot_and_skips_the_rest(trigger: Any) -> None:
    now = T0 + 30 * S + timedelta(milliseconds=500)
    slots = resolve(trigger, T0, now, timedelta(hours=1))
    assert slots.fire == T0 + 30 * S
    assert slots.skipped == 30 and slots.first_skipped == T0 and slots.last_skipped == T0 + 29 * S
    assert slots.following == T0 + 31 * S and not slots.more_skipped


@pytest.mark.parametrize("trigger", [every(60), StandardCronTrigger("* * * * *", UTC)])
def test_past_the_grace_window_nothing_fires(trigger: Any) -> None:
    now = T0 + 10 * M + 30 * S
    slots = resolve(trigger, T0, now, timedelta(seconds=10))
    assert slots.fire is None and slots.skipped >= 1 and slots.first_skipped == T0
    assert slots.following == T0 + 11 * M
    if isinstance(trigger, EveryTrigger):  # counted exactly; a walk stops at the window
        assert slots.last_skipped == T0 + 10 * M and slots.skipped == 11
    else:
        assert slots.more_skipped


def test_a_long_outage_of_a_cron_job_is_not_walked_slot_by_slot() -> None:
    trigger = StandardCronTrigger("* * * * * *", UTC)
    now = T0 + timedelta(days=30)
    slots = resolve(trigger, T0, now, timedelta(seconds=5))
    assert slots.fire == now and slots.more_skipped
    assert slots.skipped <= 7  # the first slot, then only the window's


def test_every_trigger_is_resolved_in_constant_time() -> None:
    now = T0 + timedelta(days=3650)
    slots = resolve(every(0.001), T0, now, timedelta(hours=1))
    assert slots.fire == now and slots.skipped == 3650 * 86_400_000


def test_floor_skips_what_the_previous_leader_handled() -> None:
    floor = T0 + 5 * S + timedelta(milliseconds=1)
    slots = resolve(every(1), T0, T0 + 7 * S, timedelta(hours=1), floor=floor)
    assert slots.fire == T0 + 7 * S and slots.skipped == 1  # slot 6 coalesced, 0..5 handled
    slots = resolve(every(1), T0, T0 + 5 * S + timedelta(milliseconds=2), None, floor=floor)
    assert slots.fire is None and slots.following == T0 + 6 * S


def test_a_later_origin_wins_over_the_floor() -> None:
    slots = resolve(every(1), T0 + 9 * S, T0 + 9 * S, None, floor=T0 + 5 * S)
    assert slots.fire == T0 + 9 * S


def test_jitter_delays_when_a_slot_is_due() -> None:
    trigger = every(10)

    def delay(slot: datetime) -> float:
        return 3.0

    assert resolve(trigger, T0, T0 + 2 * S, None, delay=delay, max_delay=3).fire is None
    slots = resolve(trigger, T0, T0 + 3 * S, None, delay=delay, max_delay=3)
    assert slots.fire == T0 and slots.following == T0 + 10 * S
    # A slot before the floor whose jittered fire time is after it was not handled yet.
    slots = resolve(trigger, T0, T0 + 3 * S, None, floor=T0 + S, delay=delay, max_delay=3)
    assert slots.fire == T0


def test_a_one_shot_job_finishes() -> None:
    trigger = DateTrigger(run_date=T0, timezone=UTC)
    slots = resolve(trigger, T0, T0 + S, None)
    assert slots.fire == T0 and slots.following is None
    assert resolve(trigger, T0, T0 + S, None, floor=T0 + S).fire is None  # handled already


def test_dst_daily_cron_fires_once_on_a_fall_back_day() -> None:
    zone = ZoneInfo("Europe/Berlin")
    trigger = StandardCronTrigger("30 2 * * *", zone)
    start = datetime(2026, 10, 25, 0, 0, tzinfo=zone)
    first = after(trigger, start)
    assert first is not None
    slots = resolve(trigger, first, datetime(2026, 10, 25, 4, 0, tzinfo=zone), timedelta(hours=3))
    assert slots.fire == first and slots.skipped == 0


@settings(max_examples=200, deadline=None)
@given(
    interval=st.integers(min_value=1, max_value=3600),
    phase=st.integers(min_value=0, max_value=10_000),
    late=st.integers(min_value=0, max_value=100_000),
    grace=st.one_of(st.none(), st.integers(min_value=1, max_value=20_000)),
)
def test_every_fast_path_agrees_with_the_walk(
    interval: int, phase: int, late: int, grace: int | None
) -> None:
    """The O(1) path for fixed intervals gives what walking the trigger gives."""
    trigger = every(interval)
    start = after(trigger, T0 + timedelta(seconds=phase))
    assert start is not None
    now = start + timedelta(seconds=late)
    window = None if grace is None else timedelta(seconds=grace)
    fast = resolve(trigger, start, now, window)
    walked = resolve(trigger, start, now, window, delay=lambda slot: 0.0, max_delay=0)
    assert (fast.fire, fast.following) == (walked.fire, walked.following)
    if not walked.more_skipped:
        assert fast.skipped == walked.skipped


# --- the agenda ---------------------------------------------------------------------------------


def test_build_applies_the_progress_mark() -> None:
    mark = Mark(handled=T0 + 5 * S, applied=100)
    revisions = {"known": 50, "late": 101, "ahead": 50}
    jobs = [
        job("known", every(1), T0),  # handled up to the mark: starts after it
        job("late", every(1), T0),  # written after the mark's read: its own next run
        job("ahead", every(1), T0 + 9 * S),  # a next run after the mark stands
        job("paused", every(1), None),
    ]
    agenda = Agenda()
    agenda.build(records(*jobs), mark, lambda job_id: revisions.get(job_id, 0))
    assert "paused" not in agenda and len(agenda) == 3
    now = T0 + 6 * S
    assert agenda.next_slot("known", now) == T0 + 6 * S
    assert agenda.next_slot("late", now) == T0
    assert agenda.next_slot("ahead", now) == T0 + 9 * S


def test_pop_due_in_order_and_advance() -> None:
    agenda = Agenda()
    jobs = [job(f"j{i}", every(10), T0 + i * S) for i in (3, 1, 2)]
    agenda.build(records(*jobs), None, lambda _: 0)
    due = agenda.pop_due((T0 + 2 * S).timestamp(), 10)
    assert [e.job_id for e in due] == ["j1", "j2"]
    assert agenda.next_at() == (T0 + 3 * S).timestamp()
    for entry in due:
        agenda.advance(entry, entry.slot + 10 * S)
    assert [e.job_id for e in agenda.pop_due((T0 + 20 * S).timestamp(), 10)] == ["j3", "j1", "j2"]


def test_changes_of_a_record() -> None:
    trigger = every(1)
    agenda = Agenda()
    agenda.build(records(job("a", trigger, T0)), None, lambda _: 0)
    (entry,) = agenda.pop_due((T0 + 3 * S).timestamp(), 10)
    agenda.advance(entry, T0 + 4 * S)  # the leader fired up to slot 3
    # A payload edit: same trigger, same next run in the record: progress stands.
    assert not agenda.changed("a", job("a", every(1), T0))
    assert agenda.next_slot("a", T0) == T0 + 4 * S
    # A manual trigger sets the record's next run to now: it wins.
    assert agenda.changed("a", job("a", every(1), T0 + 2 * S))
    assert agenda.next_slot("a", T0) == T0 + 2 * S
    # A new schedule: its own next run.
    assert agenda.changed("a", job("a", every(5), T0 + 5 * S))
    assert agenda.next_slot("a", T0) == T0 + 5 * S
    # Paused, then deleted.
    assert agenda.changed("a", job("a", every(5), None)) and "a" not in agenda
    assert not agenda.changed("a", None)


def test_an_undecoded_job_is_due_at_its_record_time() -> None:
    agenda = Agenda()
    agenda.build([("raw", T0 + S, None)], Mark(T0 + 5 * S, 10), lambda _: 1)
    (entry,) = agenda.pop_due((T0 + S).timestamp(), 10)
    assert entry.job is None and entry.floor == T0 + 5 * S  # resolved once decoded
    assert agenda.next_slot("raw", T0) is None


def test_stale_heap_items_are_skipped() -> None:
    agenda = Agenda()
    agenda.build(records(job("a", every(1), T0)), None, lambda _: 0)
    agenda.put(job("a", every(1), T0 + 5 * S), T0 + 5 * S)
    assert agenda.pop_due((T0 + S).timestamp(), 10) == []
    assert agenda.next_at() == (T0 + 5 * S).timestamp()


def test_display_next_of_a_follower() -> None:
    assert display_next(job("a", every(10), T0 + 30 * S), T0) == T0 + 30 * S
    assert display_next(job("a", every(10), T0), T0 + 25 * S) == T0 + 30 * S
    assert display_next(job("a", every(10), None), T0) is None
