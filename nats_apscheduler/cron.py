"""Standard (Vixie/robfig) cron expressions as an APScheduler 3 trigger.

APScheduler 3's `CronTrigger.from_crontab` numbers weekdays from Monday = 0, rejects `7`
and `?`, and ANDs day-of-month with day-of-week; its calendar walk (3.11.3) also skips
the day after a spring-forward change for jobs at hour 0 (`0 0 * * *` in Europe/Berlin
goes from 29 March to 31 March 2026). So this module parses standard cron into value
sets and walks wall-clock time itself; `StandardCronTrigger` is a plain APScheduler
`BaseTrigger`, so the scheduler and stores treat it like any other trigger.

Semantics (robfig/cron v3, which is Vixie cron plus a seconds field):
- fields `[second] minute hour day-of-month month day-of-week`; Sunday is 0 or 7;
  names `JAN..DEC`, `SUN..SAT` in any case; `*`, `?`, `a`, `a-b`, `*/n`, `a-b/n`, `a/n`
  (= `a-max/n`) and comma lists; descriptors `@yearly @annually @monthly @weekly @daily
  @midnight @hourly`.
- When day-of-month and day-of-week are both restricted, a day matching either fires.
  A field counts as unrestricted when one of its items is `*` or `?` without a step > 1
  (so `*/2` restricts, as in robfig).
- Daylight saving time: a time in the repeated hour fires once (its first occurrence)
  unless the hour field is `*`; a time in the skipped hour fires once, shifted forward by
  the gap (02:30 on a spring-forward day in Europe/Berlin fires at 03:30 CEST).
"""

from __future__ import annotations

import functools
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from apscheduler.triggers.base import BaseTrigger

from nats_apscheduler.errors import SpecError

DESCRIPTORS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
_DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int]


_SECOND = _Field("second", 0, 59, {})
_MINUTE = _Field("minute", 0, 59, {})
_HOUR = _Field("hour", 0, 23, {})
_DOM = _Field("day-of-month", 1, 31, {})
_MONTH = _Field("month", 1, 12, {m: i + 1 for i, m in enumerate(_MONTHS)})
_DOW = _Field("day-of-week", 0, 7, {d: i for i, d in enumerate(_DAYS)})


@dataclass(frozen=True)
class CronSpec:
    """A parsed standard cron expression: the allowed values of each field."""

    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday ... 6 = Saturday
    days_star: bool
    weekdays_star: bool
    hours_star: bool


def _value(text: str, field: _Field, where: str) -> int:
    upper = text.upper()
    if upper in field.names:
        return field.names[upper]
    if not text.isdigit() or not text.isascii():
        hint = f" (names: {', '.join(field.names)})" if field.names else ""
        raise SpecError(where, f"{field.name} {text!r} is not a number{hint}")
    value = int(text)
    if not field.low <= value <= field.high:
        raise SpecError(where, f"{field.name} {value} is out of range {field.low}-{field.high}")
    return value


def _parse_item(item: str, field: _Field, where: str) -> tuple[set[int], bool]:
    """One comma-separated item: returns its values and whether it counts as `*`."""
    if not item:
        raise SpecError(where, f"{field.name} has an empty list item")
    range_part, slash, step_text = item.partition("/")
    step = 1
    if slash:
        if not step_text.isdigit() or not step_text.isascii():
            raise SpecError(where, f"{field.name} step {step_text!r} is not a positive number")
        step = int(step_text)
        if step == 0:
            raise SpecError(where, f"{field.name} step must be at least 1")
    star = False
    if range_part in ("*", "?"):
        low, high, star = field.low, field.high, step == 1
    else:
        low_text, dash, high_text = range_part.partition("-")
        low = _value(low_text, field, where)
        if dash:
            high = _value(high_text, field, where)
        else:
            high = field.high if slash else low
        if low > high:
            raise SpecError(where, f"{field.name} range {range_part!r} runs backwards")
    return set(range(low, high + 1, step)), star


def _parse_field(text: str, field: _Field, where: str) -> tuple[frozenset[int], bool]:
    values: set[int] = set()
    star = False
    for item in text.split(","):
        item_values, item_star = _parse_item(item, field, where)
        values |= item_values
        star = star or item_star
    if field is _DOW and 7 in values:
        values = (values - {7}) | {0}
    return frozenset(values), star


def parse_cron(expression: str, where: str = "schedule.cron") -> CronSpec:
    """Parse a 5- or 6-field standard cron expression or a descriptor (no TZ prefix)."""
    text = expression.strip()
    if text.startswith("@"):
        if text.lower() not in DESCRIPTORS:
            raise SpecError(where, f"unknown descriptor {text!r} (use {', '.join(DESCRIPTORS)})")
        text = DESCRIPTORS[text.lower()]
    parts = text.split()
    if len(parts) == 5:
        parts = ["0", *parts]
    elif len(parts) != 6:
        raise SpecError(
            where,
            f"expected 5 fields (minute hour day-of-month month day-of-week) or 6 with "
            f"leading seconds, got {len(parts)}",
        )
    fields = (_SECOND, _MINUTE, _HOUR, _DOM, _MONTH, _DOW)
    parsed = [_parse_field(part, field, where) for part, field in zip(parts, fields, strict=True)]
    return CronSpec(
        expression=expression.strip(),
        seconds=parsed[0][0],
        minutes=parsed[1][0],
        hours=parsed[2][0],
        days=parsed[3][0],
        months=parsed[4][0],
        weekdays=parsed[5][0],
        days_star=parsed[3][1],
        weekdays_star=parsed[5][1],
        hours_star=parsed[2][1],
    )


_SECOND_STEP = timedelta(seconds=1)
# The widest DST shift in the tz database is 2 h (and no zone has two within 6 h).
_NEAR = timedelta(hours=3)
# The longest gap between matching dates of a satisfiable expression is 8 years
# (29 February across a non-leap century year).
_MAX_YEARS = 12


class _Walk:
    """Finds matching wall-clock (naive) times of a `CronSpec`."""

    def __init__(self, spec: CronSpec) -> None:
        self.spec = spec
        self.seconds = sorted(spec.seconds)
        self.minutes = sorted(spec.minutes)
        self.hours = sorted(spec.hours)
        self.months = sorted(spec.months)
        self.and_days = spec.days_star or spec.weekdays_star

    def day_matches(self, value: datetime) -> bool:
        dom = value.day in self.spec.days
        dow = (value.weekday() + 1) % 7 in self.spec.weekdays
        return (dom and dow) if self.and_days else (dom or dow)

    def next_match(self, value: datetime) -> datetime | None:
        """The first matching naive time at or after `value` (whole seconds)."""
        if value.microsecond:
            value = value.replace(microsecond=0) + _SECOND_STEP
        limit = value.year + _MAX_YEARS
        while value.year <= limit:
            if value.month not in self.spec.months:
                i = bisect_left(self.months, value.month)
                if i < len(self.months):
                    value = datetime(value.year, self.months[i], 1)
                else:
                    value = datetime(value.year + 1, self.months[0], 1)
                continue
            if not self.day_matches(value):
                value = datetime(value.year, value.month, value.day) + timedelta(days=1)
                continue
            i = bisect_left(self.hours, value.hour)
            if i == len(self.hours):
                value = datetime(value.year, value.month, value.day) + timedelta(days=1)
                continue
            if self.hours[i] != value.hour:
                value = value.replace(hour=self.hours[i], minute=0, second=0)
            i = bisect_left(self.minutes, value.minute)
            if i == len(self.minutes):
                value = value.replace(minute=0, second=0) + timedelta(hours=1)
                continue
            if self.minutes[i] != value.minute:
                value = value.replace(minute=self.minutes[i], second=0)
            i = bisect_left(self.seconds, value.second)
            if i == len(self.seconds):
                value = value.replace(second=0) + timedelta(minutes=1)
                continue
            return value.replace(second=self.seconds[i])
        return None


def _offset(instant: datetime, zone: tzinfo) -> timedelta:
    return instant.astimezone(zone).utcoffset() or timedelta(0)


def _instants(naive: datetime, zone: tzinfo, both_folds: bool) -> list[datetime]:
    """The real instants of a wall-clock time in `zone`.

    A time in a spring-forward gap is shifted forward by the gap (RFC 5545); a time in
    the repeated hour of a fall-back has two instants, the second only if `both_folds`.
    """
    first = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first == second or not both_folds:
        return [first]
    return [first, second] if first < second else [first]


@functools.lru_cache(maxsize=256)
def _walk_of(expression: str) -> _Walk:
    return _Walk(parse_cron(expression))


@functools.lru_cache(maxsize=16384)
def _next_after(expression: str, zone: tzinfo, after: datetime) -> datetime | None:
    """See `StandardCronTrigger._next_after` (`after` in UTC)."""
    walk = _walk_of(expression)
    local = after.astimezone(zone).replace(tzinfo=None, fold=0)
    both = walk.spec.hours_star
    shift = abs(_offset(after + _NEAR, zone) - _offset(after - _NEAR, zone))
    if not shift:
        # No DST change near: wall-clock order is real-time order from here on.
        candidate = walk.next_match(local + timedelta(microseconds=1))
        while candidate is not None:
            later = [t for t in _instants(candidate, zone, both) if t > after]
            if later:
                return later[0]
            candidate = walk.next_match(candidate + _SECOND_STEP)
        return None
    # Near a DST change wall-clock order and real-time order differ: look at every
    # match from `shift` before to `shift` after, then keep the earliest instant.
    best: datetime | None = None
    candidate = walk.next_match(local - shift)
    while candidate is not None:
        for instant in _instants(candidate, zone, both):
            if instant > after and (best is None or instant < best):
                best = instant
        if best is not None and candidate > local + shift:
            break
        candidate = walk.next_match(candidate + _SECOND_STEP)
    return best


class StandardCronTrigger(BaseTrigger):  # type: ignore[misc]
    """An APScheduler trigger for a standard cron expression (see the module docstring).

    Serialised by the job store as its expression, time zone, start and end.
    """

    __slots__ = ("_walk", "end_date", "expression", "spec", "start_date", "timezone")

    def __init__(
        self,
        expression: str,
        timezone: tzinfo,
        start_date: datetime | None = None,
        end_date: datetime | None = None,
    ) -> None:
        self.expression = expression
        self.timezone = timezone
        self.start_date = start_date
        self.end_date = end_date
        self._walk = _walk_of(expression)  # parsed once per expression, shared
        self.spec = self._walk.spec

    def _next_after(self, after: datetime) -> datetime | None:
        """The first fire instant strictly after `after` (aware).

        Remembered per expression, zone and moment: the jobs of a herd share their schedule
        and their slot, so 30,000 of them cost one calendar walk, not 30,000."""
        # The key in UTC: aware times of one zone compare (and hash) by wall clock, so the
        # two instants of a repeated hour would share an entry.
        return _next_after(self.expression, self.timezone, after.astimezone(UTC))

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        if previous_fire_time is not None:
            after = previous_fire_time
        else:
            after = now - timedelta(microseconds=1)
            if self.start_date is not None and self.start_date > now:
                after = self.start_date - timedelta(microseconds=1)
        result = self._next_after(after)
        if result is None or (self.end_date is not None and result > self.end_date):
            return None
        return result.astimezone(self.timezone)

    def fire_times(self, now: datetime, count: int) -> Sequence[datetime]:
        """The next `count` fire times after `now` (for previews and tests)."""
        return fire_times(self, now, count)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "version": 1,
            "expression": self.expression,
            "timezone": self.timezone,
            "start_date": self.start_date,
            "end_date": self.end_date,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["expression"], state["timezone"], state["start_date"], state["end_date"]
        )

    def __str__(self) -> str:
        return f"cron[{self.expression}]"

    def __repr__(self) -> str:
        return f"<StandardCronTrigger ({self.expression!r}, timezone='{self.timezone}')>"


def fire_times(trigger: BaseTrigger, now: datetime, count: int) -> list[datetime]:
    """The next `count` fire times of any APScheduler trigger, from `now` (previews)."""
    out: list[datetime] = []
    previous: datetime | None = None
    while len(out) < count:
        nxt = trigger.get_next_fire_time(previous, now if previous is None else previous)
        if nxt is None:
            break
        out.append(nxt)
        previous = nxt
    return out
