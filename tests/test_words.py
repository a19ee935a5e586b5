"""Schedules in words (the dashboard's), read from the same parsed cron as the scheduler."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from nats_apscheduler.words import describe, duration_words


@pytest.mark.parametrize(
    ("schedule", "words"),
    [
        ({"every": "30s"}, "every 30 seconds"),
        ({"every": "1h"}, "every hour"),
        ({"every": "1h30m"}, "every 1 hour 30 minutes"),
        ({"every": "1.5h"}, "every 1 hour 30 minutes"),
        ({"every": "300ms"}, "every 300 milliseconds"),
        ({"at": "2027-01-02T03:04:05+00:00"}, "once, at 2027-01-02T03:04:05+00:00"),
        (
            {"cron": "0 9 * * MON-FRI", "timezone": "Europe/Berlin"},
            "at 09:00, on Monday to Friday (Europe/Berlin)",
        ),
        ({"cron": "*/5 * * * *"}, "every 5 minutes (UTC)"),
        ({"cron": "* * * * *"}, "every minute (UTC)"),
        ({"cron": "*/10 * * * * *"}, "every 10 seconds (UTC)"),
        ({"cron": "@daily"}, "at 00:00, every day (UTC)"),
        ({"cron": "@hourly"}, "every hour, on the hour (UTC)"),
        ({"cron": "@weekly"}, "at 00:00, on Sunday (UTC)"),
        ({"cron": "@monthly"}, "at 00:00, on day 1 of the month (UTC)"),
        ({"cron": "@yearly"}, "at 00:00, on 1 January (UTC)"),
        ({"cron": "0 */2 * * *"}, "every 2 hours, on the hour (UTC)"),
        # Day-of-month OR day-of-week when both are restricted (robfig, Vixie).
        ({"cron": "0 12 13 * 5"}, "at 12:00, on day 13 of the month and on Friday (UTC)"),
        # Sunday is 0 or 7.
        ({"cron": "15 0 * * 7"}, "at 00:15, on Sunday (UTC)"),
        ({"cron": "0 0 9,17 * * SAT,SUN"}, "at 09:00 and 17:00, on Saturday and Sunday (UTC)"),
        (
            {"cron": "*/15 9-17 * * 1-5"},
            "every 15 minutes, hours 09 to 17, on Monday to Friday (UTC)",
        ),
        ({"cron": "30 2 1,15 * *"}, "at 02:30, on day 1 and 15 of the month (UTC)"),
        (
            {"cron": "0 0 1 1-3,6 *"},
            "at 00:00, on day 1 of the month, in January to March and June (UTC)",
        ),
        (
            {"cron": "0 8-18/2 * * *"},
            "at 08:00, 10:00, 12:00, 14:00, 16:00 and 18:00, every day (UTC)",
        ),
        ({"cron": "5,10,20,40,50 * * * *"}, "every hour, at minute 5, 10, 20, 40 and 50 (UTC)"),
        ({"cron": "TZ=America/New_York 0 9 * * *"}, "at 09:00, every day (America/New_York)"),
        ({"cron": "@every 5m"}, "every 5 minutes"),
        (
            {"every": "30s", "end": "2027-01-01T00:00:00Z"},
            "every 30 seconds until 2027-01-01T00:00:00Z",
        ),
    ],
)
def test_schedules_in_words(schedule: dict[str, Any], words: str) -> None:
    assert describe(schedule) == words


@pytest.mark.parametrize(
    ("schedule", "shown"),
    [
        ({"cron": "not cron"}, "not cron"),
        ({"cron": "61 * * * *"}, "61 * * * *"),
        ({"every": "1d"}, "1d"),
        ({}, ""),
        ({"cron": 5}, ""),
    ],
)
def test_what_it_cannot_describe_comes_back_as_written(schedule: Any, shown: str) -> None:
    assert describe(schedule) == shown
    assert describe(None) == "" and describe("0 9 * * *") == ""


def test_durations_in_words() -> None:
    assert duration_words(timedelta(hours=2, minutes=1, seconds=5)) == "2 hours 1 minute 5 seconds"
    assert duration_words(timedelta(0)) == "0 seconds"
    assert duration_words(timedelta(microseconds=5)) == "5 microseconds"
