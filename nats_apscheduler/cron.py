"""Standard (Vixie/robfig) cron expressions, translated onto APScheduler 3 triggers.

APScheduler 3's `CronTrigger.from_crontab` numbers weekdays from Monday = 0, rejects `7`
and `?`, and ANDs day-of-month with day-of-week. This module parses standard cron itself
into explicit value sets and lets APScheduler's `CronTrigger` do only the calendar walk.

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

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

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


def _join(values: frozenset[int], full: int) -> str:
    return "*" if len(values) == full else ",".join(str(v) for v in sorted(values))


def _aps_weekdays(weekdays: frozenset[int]) -> str:
    # APScheduler 3 numbers Monday as 0; standard cron numbers Sunday as 0.
    return "*" if len(weekdays) == 7 else ",".join(str((d - 1) % 7) for d in sorted(weekdays))


def _is_repeated_wall_time(value: datetime) -> bool:
    """True for the second occurrence of a wall time in a DST fall-back hour."""
    if not value.fold:
        return False
    return value.replace(fold=0).utcoffset() != value.utcoffset()


class StandardCronTrigger(BaseTrigger):  # type: ignore[misc]
    """An APScheduler trigger for a standard cron expression (see the module docstring).

    Serialised by the job store as its expression, time zone, start and end.
    """

    __slots__ = ("_triggers", "end_date", "expression", "spec", "start_date", "timezone")

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
        self.spec = parse_cron(expression)
        self._triggers = self._build()

    def _build(self) -> list[CronTrigger]:
        spec = self.spec
        common: dict[str, Any] = {
            "second": _join(spec.seconds, 60),
            "minute": _join(spec.minutes, 60),
            "hour": _join(spec.hours, 24),
            "month": _join(spec.months, 12),
            "timezone": self.timezone,
            "start_date": self.start_date,
            "end_date": self.end_date,
        }
        days = _join(spec.days, 31)
        weekdays = _aps_weekdays(spec.weekdays)
        if spec.days_star or spec.weekdays_star:
            return [CronTrigger(day=days, day_of_week=weekdays, **common)]
        return [
            CronTrigger(day=days, day_of_week="*", **common),
            CronTrigger(day="*", day_of_week=weekdays, **common),
        ]

    def _next(self, previous: datetime | None, now: datetime) -> datetime | None:
        times = [t.get_next_fire_time(previous, now) for t in self._triggers]
        candidates = [t for t in times if t is not None]
        return min(candidates) if candidates else None

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        result = self._next(previous_fire_time, now)
        # Fire a fixed-hour job once in the repeated hour of a DST fall-back.
        while result is not None and not self.spec.hours_star and _is_repeated_wall_time(result):
            result = self._next(result, result)
        # A wall time in a spring-forward gap comes back with the pre-gap offset; show the
        # real instant in the zone's real local time.
        return None if result is None else result.astimezone(UTC).astimezone(self.timezone)

    def fire_times(self, now: datetime, count: int) -> Sequence[datetime]:
        """The next `count` fire times after `now` (for previews and tests)."""
        out: list[datetime] = []
        previous: datetime | None = None
        while len(out) < count:
            nxt = self.get_next_fire_time(previous, now if previous is None else previous)
            if nxt is None:
                break
            out.append(nxt)
            previous = nxt
        return out

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
