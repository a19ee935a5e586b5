"""A job's schedule in plain English, for people (the dashboard). Pure, no I/O.

`describe(schedule)` takes a job document's `schedule` and never raises: what it cannot
put in words (or a schedule that does not parse) comes back as written. The words follow
the semantics of `cron.py` (Sunday 0 or 7, day-of-month OR day-of-week when both are
restricted), because they are read from the same parsed value sets.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from nats_apscheduler.cron import CronSpec, parse_cron
from nats_apscheduler.durations import parse_duration
from nats_apscheduler.errors import SpecError

_DAY_NAMES = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
_MONTH_NAMES = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
_TZ_PREFIX = re.compile(r"^(?:CRON_TZ|TZ)=(\S+)\s+(.*)$", re.DOTALL)
_EVERY = re.compile(r"^@every\s+(\S+)$", re.IGNORECASE)
_MAX_TIMES = 6  # more distinct times of day than this are described by their fields
_UNITS = (
    ("hour", timedelta(hours=1)),
    ("minute", timedelta(minutes=1)),
    ("second", timedelta(seconds=1)),
    ("millisecond", timedelta(milliseconds=1)),
)


def describe(schedule: Mapping[str, Any] | Any) -> str:
    """`{"cron": "0 9 * * MON-FRI", "timezone": "Europe/Berlin"}` -> "at 09:00, Monday
    to Friday (Europe/Berlin)". Anything it cannot describe is returned as written."""
    if not isinstance(schedule, Mapping):
        return ""
    try:
        words = _describe(schedule)
    except (SpecError, ValueError, TypeError, OverflowError):
        words = None
    if words is None:
        for key in ("cron", "every", "at"):
            if isinstance(schedule.get(key), str):
                return str(schedule[key])
        return ""
    bounds = []
    if isinstance(schedule.get("start"), str):
        bounds.append(f"from {schedule['start']}")
    if isinstance(schedule.get("end"), str):
        bounds.append(f"until {schedule['end']}")
    return " ".join([words, *bounds])


def duration_words(value: timedelta) -> str:
    """`timedelta(minutes=90)` -> "1 hour 30 minutes"."""
    parts = []
    rest = value
    for name, size in _UNITS:
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count} {name}{'' if count == 1 else 's'}")
    if rest:
        parts.append(f"{rest // timedelta(microseconds=1)} microseconds")
    return " ".join(parts) or "0 seconds"


def _every(text: str) -> str:
    value = parse_duration(text, "schedule.every")
    for name, size in _UNITS:
        if value == size:
            return f"every {name}"
    return f"every {duration_words(value)}"


def _describe(schedule: Mapping[str, Any]) -> str | None:
    every, cron, at = schedule.get("every"), schedule.get("cron"), schedule.get("at")
    zone = schedule.get("timezone") if isinstance(schedule.get("timezone"), str) else None
    if isinstance(every, str):
        return _every(every)
    if isinstance(at, str):
        return f"once, at {at}"
    if not isinstance(cron, str):
        return None
    text = cron.strip()
    prefix = _TZ_PREFIX.match(text)
    if prefix is not None:
        zone, text = prefix.group(1), prefix.group(2).strip()
    descriptor = _EVERY.match(text)
    if descriptor is not None:
        return _every(descriptor.group(1))
    spec = parse_cron(text)
    time_of_day, days = _time_of_day(spec), _days(spec)
    if days == "every day" and time_of_day.startswith("every"):
        days = ""  # "every 5 minutes", not "every 5 minutes, every day"
    words = ", ".join(part for part in (time_of_day, days) if part)
    return f"{words} ({zone or 'UTC'})"


# --- cron -------------------------------------------------------------------------------------


def _step(values: frozenset[int], low: int, high: int) -> int | None:
    """The step of `values` when they are `low`, `low+k`, ... up to the top of the range
    (what `*/k` gives), else None. 1 means every value."""
    ordered = sorted(values)
    if len(ordered) < 2 or ordered[0] != low:
        return None
    step = ordered[1] - ordered[0]
    if any(b - a != step for a, b in itertools.pairwise(ordered)):
        return None
    return step if ordered[-1] + step > high else None


def _ranges(values: Sequence[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for value in sorted(values):
        if out and value == out[-1][1] + 1:
            out[-1] = (out[-1][0], value)
        else:
            out.append((value, value))
    return out


def _listed(values: Sequence[int], name: Any = str, through: str = " to ") -> str:
    """`[1, 2, 3, 5]` -> "1 to 3 and 5" (names instead of numbers with `name`)."""
    items = []
    for low, high in _ranges(values):
        if high - low >= 2:
            items.append(f"{name(low)}{through}{name(high)}")
        else:
            items.extend(name(v) for v in range(low, high + 1))
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _plural(count: int, unit: str) -> str:
    return f"every {unit}" if count == 1 else f"every {count} {unit}s"


def _time_of_day(spec: CronSpec) -> str:
    seconds, minutes, hours = spec.seconds, spec.minutes, spec.hours
    second_step = _step(seconds, 0, 59)
    minute_step = _step(minutes, 0, 59)
    hour_step = _step(hours, 0, 23)
    all_hours = hour_step == 1
    if len(seconds) * len(minutes) * len(hours) <= _MAX_TIMES:
        with_seconds = seconds != {0}
        times = sorted((h, m, s) for h in hours for m in minutes for s in seconds)
        shown = [f"{h:02d}:{m:02d}" + (f":{s:02d}" if with_seconds else "") for h, m, s in times]
        return "at " + _join(shown)
    if second_step is not None:
        every = _plural(second_step, "second")
        if minute_step == 1 and all_hours:
            return every
        return f"{every}, {_minutes_hours(minutes, hours, minute_step, hour_step)}"
    at_second = "" if seconds == {0} else f" at second {_listed(sorted(seconds))}"
    if minute_step is not None:
        every = _plural(minute_step, "minute") + at_second
        if all_hours:
            return every
        return f"{every}, {_hours(hours, hour_step)}"
    if hour_step is not None:
        if minutes == {0} and not at_second:
            return _plural(hour_step, "hour") + ", on the hour"
        past = f"at minute {_listed(sorted(minutes))}{at_second}"
        return f"{_plural(hour_step, 'hour')}, {past}"
    return f"at minute {_listed(sorted(minutes))}{at_second}, {_hours(hours, hour_step)}"


def _minutes_hours(
    minutes: frozenset[int], hours: frozenset[int], minute_step: int | None, hour_step: int | None
) -> str:
    parts = []
    if minute_step != 1:
        parts.append(
            f"every {minute_step} minutes"
            if minute_step is not None
            else f"minute {_listed(sorted(minutes))}"
        )
    if hour_step != 1:
        parts.append(_hours(hours, hour_step))
    return ", ".join(parts)


def _hours(hours: frozenset[int], hour_step: int | None) -> str:
    if hour_step is not None and hour_step > 1:
        return f"every {hour_step} hours"
    if len(hours) == 1:
        return f"hour {min(hours):02d}"
    return "hours " + _listed(sorted(hours), lambda h: f"{h:02d}")


def _days(spec: CronSpec) -> str:
    weekdays = sorted(spec.weekdays)
    days = sorted(spec.days)
    months = sorted(spec.months)
    all_months = len(months) == 12
    day_names = _weekday_words(weekdays)
    if spec.days_star and spec.weekdays_star:
        which = "every day"
    elif spec.days_star or spec.weekdays_star:
        # robfig: with one day field restricted, that one decides.
        if spec.days_star:
            which = f"on {day_names}"
        elif len(days) == 1 and len(months) == 1:
            return f"on {days[0]} {_MONTH_NAMES[months[0] - 1]}"
        else:
            which = f"on day {_listed(days)} of the month"
    else:
        which = f"on day {_listed(days)} of the month and on {day_names}"
    if all_months:
        return which
    return f"{which}, in {_listed(months, lambda m: _MONTH_NAMES[m - 1], ' to ')}"


def _weekday_words(weekdays: list[int]) -> str:
    if weekdays == [1, 2, 3, 4, 5]:
        return "Monday to Friday"
    if weekdays == [0, 6]:
        return "Saturday and Sunday"
    return _listed(weekdays, lambda d: _DAY_NAMES[d], " to ")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
