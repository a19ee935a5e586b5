"""Standard cron semantics (SPEC §2): a table of hand-computed fire times, DST, errors.

Every expectation below was worked out from the calendar and the cron rules, not by
running the code under test. Calendar facts used: 2026-01-01 is a Thursday; the 1st of
each month in 2026 falls on Thu Sun Sun Wed Fri Mon Wed Sat Tue Thu Sun Tue.
"""

from __future__ import annotations

import itertools
import pickle
import re
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from nats_apscheduler.cron import StandardCronTrigger, parse_cron
from nats_apscheduler.errors import SpecError
from nats_apscheduler.spec import parse_job

BERLIN = "Europe/Berlin"
NEW_YORK = "America/New_York"

# (id, expression, zone, start instant, expected fire times as aware ISO strings)
CASES: list[tuple[str, str, str, str, list[str]]] = [
    # --- single field forms -----------------------------------------------------------
    (
        "every-minute",
        "* * * * *",
        "UTC",
        "2026-01-01T00:00:30Z",
        ["2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z", "2026-01-01T00:03:00Z"],
    ),
    (
        "question-mark-minute",
        "? * * * *",
        "UTC",
        "2026-01-01T00:00:30Z",
        ["2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z", "2026-01-01T00:03:00Z"],
    ),
    (
        "fixed-minute",
        "5 * * * *",
        "UTC",
        "2026-01-01T00:00:30Z",
        ["2026-01-01T00:05:00Z", "2026-01-01T01:05:00Z", "2026-01-01T02:05:00Z"],
    ),
    (
        "fixed-time-daily",
        "0 9 * * *",
        "UTC",
        "2026-01-01T10:00:00Z",
        ["2026-01-02T09:00:00Z", "2026-01-03T09:00:00Z", "2026-01-04T09:00:00Z"],
    ),
    (
        "minute-list",
        "15,45 * * * *",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-01-01T00:15:00Z",
            "2026-01-01T00:45:00Z",
            "2026-01-01T01:15:00Z",
            "2026-01-01T01:45:00Z",
        ],
    ),
    (
        "minute-range",
        "10-12 8 * * *",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-01-01T08:10:00Z",
            "2026-01-01T08:11:00Z",
            "2026-01-01T08:12:00Z",
            "2026-01-02T08:10:00Z",
        ],
    ),
    (
        "star-step-15",
        "*/15 * * * *",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-01-01T00:15:00Z",
            "2026-01-01T00:30:00Z",
            "2026-01-01T00:45:00Z",
            "2026-01-01T01:00:00Z",
        ],
    ),
    (
        "star-step-7-restarts-each-hour",
        "*/7 * * * *",
        "UTC",
        "2026-01-01T00:50:00Z",
        [
            "2026-01-01T00:56:00Z",
            "2026-01-01T01:00:00Z",
            "2026-01-01T01:07:00Z",
            "2026-01-01T01:14:00Z",
        ],
    ),
    (
        "range-step",
        "10-30/10 * * * *",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-01-01T00:10:00Z",
            "2026-01-01T00:20:00Z",
            "2026-01-01T00:30:00Z",
            "2026-01-01T01:10:00Z",
        ],
    ),
    (
        "start-step",
        "50/5 * * * *",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-01-01T00:50:00Z",
            "2026-01-01T00:55:00Z",
            "2026-01-01T01:50:00Z",
            "2026-01-01T01:55:00Z",
        ],
    ),
    (
        "hour-step",
        "0 */6 * * *",
        "UTC",
        "2026-01-01T01:00:00Z",
        [
            "2026-01-01T06:00:00Z",
            "2026-01-01T12:00:00Z",
            "2026-01-01T18:00:00Z",
            "2026-01-02T00:00:00Z",
        ],
    ),
    (
        "hour-range-step",
        "0 9-17/4 * * *",
        "UTC",
        "2026-01-01T10:00:00Z",
        [
            "2026-01-01T13:00:00Z",
            "2026-01-01T17:00:00Z",
            "2026-01-02T09:00:00Z",
            "2026-01-02T13:00:00Z",
        ],
    ),
    (
        "hour-start-step-1",
        "0 22/1 * * *",
        "UTC",
        "2026-01-01T00:00:30Z",
        ["2026-01-01T22:00:00Z", "2026-01-01T23:00:00Z", "2026-01-02T22:00:00Z"],
    ),
    (
        "mixed-list",
        "0 1,5-7,20/2 * * *",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-01-01T01:00:00Z",
            "2026-01-01T05:00:00Z",
            "2026-01-01T06:00:00Z",
            "2026-01-01T07:00:00Z",
            "2026-01-01T20:00:00Z",
            "2026-01-01T22:00:00Z",
        ],
    ),
    (
        "business-hours",
        "0,30 9-10 * * 1-5",
        "UTC",
        "2026-01-02T10:15:00Z",
        [
            "2026-01-02T10:30:00Z",
            "2026-01-05T09:00:00Z",
            "2026-01-05T09:30:00Z",
            "2026-01-05T10:00:00Z",
            "2026-01-05T10:30:00Z",
        ],
    ),
    (
        "extra-whitespace",
        "  0\t9  *   *  *  ",
        "UTC",
        "2026-01-01T10:00:00Z",
        ["2026-01-02T09:00:00Z", "2026-01-03T09:00:00Z"],
    ),
    # --- day of month, months, leap years, month ends ---------------------------------
    (
        "first-of-month",
        "0 0 1 * *",
        "UTC",
        "2026-01-15T00:00:00Z",
        ["2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"],
    ),
    (
        "fifteenth",
        "0 0 15 * *",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2026-01-15T00:00:00Z", "2026-02-15T00:00:00Z", "2026-03-15T00:00:00Z"],
    ),
    (
        "31st-skips-short-months",
        "0 0 31 * *",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-01-31T00:00:00Z",
            "2026-03-31T00:00:00Z",
            "2026-05-31T00:00:00Z",
            "2026-07-31T00:00:00Z",
            "2026-08-31T00:00:00Z",
        ],
    ),
    (
        "30th-skips-february",
        "0 0 30 * *",
        "UTC",
        "2026-01-31T00:00:00Z",
        ["2026-03-30T00:00:00Z", "2026-04-30T00:00:00Z", "2026-05-30T00:00:00Z"],
    ),
    (
        "leap-day",
        "0 0 29 2 *",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z", "2036-02-29T00:00:00Z"],
    ),
    (
        "leap-day-skips-2100",
        "0 0 29 2 *",
        "UTC",
        "2096-03-01T00:00:00Z",
        ["2104-02-29T00:00:00Z", "2108-02-29T00:00:00Z"],
    ),
    (
        "february-end-range",
        "0 0 28-31 2 *",
        "UTC",
        "2027-01-01T00:00:00Z",
        [
            "2027-02-28T00:00:00Z",
            "2028-02-28T00:00:00Z",
            "2028-02-29T00:00:00Z",
            "2029-02-28T00:00:00Z",
        ],
    ),
    (
        "new-year",
        "0 0 1 1 *",
        "UTC",
        "2026-06-01T00:00:00Z",
        ["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z", "2029-01-01T00:00:00Z"],
    ),
    (
        "new-years-eve",
        "59 23 31 12 *",
        "UTC",
        "2026-06-01T00:00:00Z",
        ["2026-12-31T23:59:00Z", "2027-12-31T23:59:00Z", "2028-12-31T23:59:00Z"],
    ),
    (
        "month-names-lower",
        "0 0 1 jan,jul *",
        "UTC",
        "2026-02-01T12:00:00Z",
        ["2026-07-01T00:00:00Z", "2027-01-01T00:00:00Z", "2027-07-01T00:00:00Z"],
    ),
    (
        "month-name-range",
        "0 0 1 JAN-MAR *",
        "UTC",
        "2026-01-15T00:00:00Z",
        ["2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", "2027-01-01T00:00:00Z"],
    ),
    (
        "month-name-mixed-case",
        "0 0 1 Jun *",
        "UTC",
        "2026-01-01T00:00:30Z",
        ["2026-06-01T00:00:00Z", "2027-06-01T00:00:00Z"],
    ),
    (
        "month-name-start-step",
        "0 0 1 dec/1 *",
        "UTC",
        "2026-01-01T00:00:30Z",
        ["2026-12-01T00:00:00Z", "2027-12-01T00:00:00Z"],
    ),
    (
        "month-star-step",
        "0 0 1 */3 *",
        "UTC",
        "2026-02-01T00:00:30Z",
        [
            "2026-04-01T00:00:00Z",
            "2026-07-01T00:00:00Z",
            "2026-10-01T00:00:00Z",
            "2027-01-01T00:00:00Z",
        ],
    ),
    (
        "month-range-step",
        "0 0 1 2-12/5 *",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-02-01T00:00:00Z",
            "2026-07-01T00:00:00Z",
            "2026-12-01T00:00:00Z",
            "2027-02-01T00:00:00Z",
        ],
    ),
    (
        "month-and-dom-names-feb",
        "0 0 14 feb *",
        "UTC",
        "2026-03-01T00:00:00Z",
        ["2027-02-14T00:00:00Z", "2028-02-14T00:00:00Z"],
    ),
    # --- day of week --------------------------------------------------------------------
    (
        "sunday-0",
        "0 0 * * 0",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2026-01-04T00:00:00Z", "2026-01-11T00:00:00Z", "2026-01-18T00:00:00Z"],
    ),
    (
        "sunday-7",
        "0 0 * * 7",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2026-01-04T00:00:00Z", "2026-01-11T00:00:00Z", "2026-01-18T00:00:00Z"],
    ),
    (
        "sunday-name",
        "0 0 * * sun",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2026-01-04T00:00:00Z", "2026-01-11T00:00:00Z", "2026-01-18T00:00:00Z"],
    ),
    (
        "monday-1",
        "0 0 * * 1",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2026-01-05T00:00:00Z", "2026-01-12T00:00:00Z", "2026-01-19T00:00:00Z"],
    ),
    (
        "monday-name",
        "0 0 * * MON",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2026-01-05T00:00:00Z", "2026-01-12T00:00:00Z", "2026-01-19T00:00:00Z"],
    ),
    (
        "readme-monday-9",
        "0 9 * * MON",
        "UTC",
        "2026-01-05T09:00:30Z",
        ["2026-01-12T09:00:00Z", "2026-01-19T09:00:00Z"],
    ),
    (
        "saturday-6",
        "0 0 * * 6",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2026-01-03T00:00:00Z", "2026-01-10T00:00:00Z"],
    ),
    (
        "weekdays-name-range",
        "0 0 * * mon-fri",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-01-02T00:00:00Z",
            "2026-01-05T00:00:00Z",
            "2026-01-06T00:00:00Z",
            "2026-01-07T00:00:00Z",
        ],
    ),
    (
        "fri-sat-sun-5-7",
        "0 0 * * 5-7",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-01-02T00:00:00Z",
            "2026-01-03T00:00:00Z",
            "2026-01-04T00:00:00Z",
            "2026-01-09T00:00:00Z",
        ],
    ),
    (
        "weekend-0-6",
        "0 0 * * 0,6",
        "UTC",
        "2026-01-01T00:00:00Z",
        [
            "2026-01-03T00:00:00Z",
            "2026-01-04T00:00:00Z",
            "2026-01-10T00:00:00Z",
            "2026-01-11T00:00:00Z",
        ],
    ),
    (
        "weekend-6-7",
        "0 0 * * 6,7",
        "UTC",
        "2026-01-01T00:00:00Z",
        [
            "2026-01-03T00:00:00Z",
            "2026-01-04T00:00:00Z",
            "2026-01-10T00:00:00Z",
            "2026-01-11T00:00:00Z",
        ],
    ),
    (
        "weekend-names-any-case",
        "0 0 * * sat,SUN",
        "UTC",
        "2026-01-01T00:00:00Z",
        [
            "2026-01-03T00:00:00Z",
            "2026-01-04T00:00:00Z",
            "2026-01-10T00:00:00Z",
            "2026-01-11T00:00:00Z",
        ],
    ),
    (
        "weekday-name-fri",
        "30 17 * * Fri",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2026-01-02T17:30:00Z", "2026-01-09T17:30:00Z"],
    ),
    (
        "dow-star-step-2",
        "0 0 * * */2",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-01-03T00:00:00Z",
            "2026-01-04T00:00:00Z",
            "2026-01-06T00:00:00Z",
            "2026-01-08T00:00:00Z",
        ],
    ),
    (
        "dow-range-step",
        "0 0 * * 1-5/2",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-01-02T00:00:00Z",
            "2026-01-05T00:00:00Z",
            "2026-01-07T00:00:00Z",
            "2026-01-09T00:00:00Z",
        ],
    ),
    (
        "dow-name-start-step",
        "0 0 * * TUE/2",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-01-03T00:00:00Z",
            "2026-01-06T00:00:00Z",
            "2026-01-08T00:00:00Z",
            "2026-01-10T00:00:00Z",
        ],
    ),
    # --- day-of-month OR day-of-week --------------------------------------------------
    (
        "dom-or-dow-13-friday",
        "0 12 13 * 5",
        "UTC",
        "2026-04-01T00:00:00Z",
        [
            "2026-04-03T12:00:00Z",
            "2026-04-10T12:00:00Z",
            "2026-04-13T12:00:00Z",
            "2026-04-17T12:00:00Z",
            "2026-04-24T12:00:00Z",
        ],
    ),
    (
        "dom-or-dow-1st-monday",
        "0 0 1 * MON",
        "UTC",
        "2026-01-01T00:00:30Z",
        [
            "2026-01-05T00:00:00Z",
            "2026-01-12T00:00:00Z",
            "2026-01-19T00:00:00Z",
            "2026-01-26T00:00:00Z",
            "2026-02-01T00:00:00Z",
            "2026-02-02T00:00:00Z",
        ],
    ),
    (
        "dom-star-step-restricts",
        "0 0 */2 * 1",
        "UTC",
        "2026-01-10T00:00:30Z",
        [
            "2026-01-11T00:00:00Z",
            "2026-01-12T00:00:00Z",
            "2026-01-13T00:00:00Z",
            "2026-01-15T00:00:00Z",
            "2026-01-17T00:00:00Z",
        ],
    ),
    (
        "dow-star-step-restricts",
        "0 0 13 * */2",
        "UTC",
        "2026-04-11T00:00:30Z",
        [
            "2026-04-12T00:00:00Z",
            "2026-04-13T00:00:00Z",
            "2026-04-14T00:00:00Z",
            "2026-04-16T00:00:00Z",
        ],
    ),
    (
        "dom-full-range-restricts",
        "0 0 1-31 * 1",
        "UTC",
        "2026-01-01T00:00:30Z",
        ["2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z", "2026-01-04T00:00:00Z"],
    ),
    (
        "dow-star-step-1-is-star",
        "0 0 13 * */1",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2026-01-13T00:00:00Z", "2026-02-13T00:00:00Z", "2026-03-13T00:00:00Z"],
    ),
    (
        "dow-question-mark",
        "0 0 13 * ?",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2026-01-13T00:00:00Z", "2026-02-13T00:00:00Z", "2026-03-13T00:00:00Z"],
    ),
    (
        "dom-question-mark",
        "0 0 ? * 5",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2026-01-02T00:00:00Z", "2026-01-09T00:00:00Z", "2026-01-16T00:00:00Z"],
    ),
    (
        "dom-question-mark-daily",
        "0 12 ? * *",
        "UTC",
        "2026-01-01T13:00:00Z",
        ["2026-01-02T12:00:00Z", "2026-01-03T12:00:00Z"],
    ),
    (
        "dom-and-month-and-dow",
        "0 0 1 3 mon",
        "UTC",
        "2026-01-01T00:00:00Z",
        [
            "2026-03-01T00:00:00Z",
            "2026-03-02T00:00:00Z",
            "2026-03-09T00:00:00Z",
            "2026-03-16T00:00:00Z",
            "2026-03-23T00:00:00Z",
            "2026-03-30T00:00:00Z",
            "2027-03-01T00:00:00Z",
        ],
    ),
    # --- descriptors --------------------------------------------------------------------
    (
        "yearly",
        "@yearly",
        "UTC",
        "2026-03-03T00:00:00Z",
        ["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z", "2029-01-01T00:00:00Z"],
    ),
    (
        "annually",
        "@annually",
        "UTC",
        "2026-03-03T00:00:00Z",
        ["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z", "2029-01-01T00:00:00Z"],
    ),
    (
        "monthly",
        "@monthly",
        "UTC",
        "2026-01-15T00:00:00Z",
        ["2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"],
    ),
    (
        "weekly",
        "@weekly",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2026-01-04T00:00:00Z", "2026-01-11T00:00:00Z", "2026-01-18T00:00:00Z"],
    ),
    (
        "daily",
        "@daily",
        "UTC",
        "2026-01-01T12:00:00Z",
        ["2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z", "2026-01-04T00:00:00Z"],
    ),
    (
        "midnight",
        "@midnight",
        "UTC",
        "2026-01-01T12:00:00Z",
        ["2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z", "2026-01-04T00:00:00Z"],
    ),
    (
        "hourly",
        "@hourly",
        "UTC",
        "2026-01-01T00:30:00Z",
        ["2026-01-01T01:00:00Z", "2026-01-01T02:00:00Z", "2026-01-01T03:00:00Z"],
    ),
    (
        "daily-in-zone",
        "@daily",
        BERLIN,
        "2026-01-01T12:00:00Z",
        ["2026-01-02T00:00:00+01:00", "2026-01-03T00:00:00+01:00"],
    ),
    # --- six fields (leading seconds) -------------------------------------------------
    (
        "seconds-fixed",
        "30 * * * * *",
        "UTC",
        "2026-01-01T00:00:45Z",
        ["2026-01-01T00:01:30Z", "2026-01-01T00:02:30Z", "2026-01-01T00:03:30Z"],
    ),
    (
        "seconds-step",
        "*/15 * * * * *",
        "UTC",
        "2026-01-01T00:00:01Z",
        [
            "2026-01-01T00:00:15Z",
            "2026-01-01T00:00:30Z",
            "2026-01-01T00:00:45Z",
            "2026-01-01T00:01:00Z",
        ],
    ),
    (
        "seconds-list-yearly",
        "10,20 30 9 1 1 *",
        "UTC",
        "2026-01-01T00:00:30Z",
        ["2026-01-01T09:30:10Z", "2026-01-01T09:30:20Z", "2027-01-01T09:30:10Z"],
    ),
    (
        "seconds-monday-noon",
        "0 0 12 * * MON",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2026-01-05T12:00:00Z", "2026-01-12T12:00:00Z", "2026-01-19T12:00:00Z"],
    ),
    (
        "seconds-leap-day",
        "0 0 0 29 2 ?",
        "UTC",
        "2026-01-01T00:00:00Z",
        ["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"],
    ),
    (
        "seconds-every-second",
        "* * * * * *",
        "UTC",
        "2026-01-01T00:00:00.500Z",
        ["2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z", "2026-01-01T00:00:03Z"],
    ),
    # --- fixed-offset and non-DST zones -----------------------------------------------
    (
        "tokyo",
        "0 9 * * *",
        "Asia/Tokyo",
        "2026-01-01T00:00:30Z",
        ["2026-01-02T09:00:00+09:00", "2026-01-03T09:00:00+09:00", "2026-01-04T09:00:00+09:00"],
    ),
    (
        "kolkata-half-hour-offset",
        "0 0 * * *",
        "Asia/Kolkata",
        "2026-01-01T00:00:00Z",
        ["2026-01-02T00:00:00+05:30", "2026-01-03T00:00:00+05:30"],
    ),
    (
        "new-york-monthly-offsets",
        "0 0 1 * *",
        NEW_YORK,
        "2026-01-01T00:00:30Z",
        [
            "2026-01-01T00:00:00-05:00",
            "2026-02-01T00:00:00-05:00",
            "2026-03-01T00:00:00-05:00",
            "2026-04-01T00:00:00-04:00",
        ],
    ),
    (
        "berlin-friday-late-evening",
        "0 23 * * 5",
        BERLIN,
        "2026-01-01T00:00:00Z",
        ["2026-01-02T23:00:00+01:00", "2026-01-09T23:00:00+01:00", "2026-01-16T23:00:00+01:00"],
    ),
    (
        "berlin-daily-across-spring",
        "0 9 * * *",
        BERLIN,
        "2026-03-27T12:00:00Z",
        ["2026-03-28T09:00:00+01:00", "2026-03-29T09:00:00+02:00", "2026-03-30T09:00:00+02:00"],
    ),
    (
        "sydney-daily-across-autumn",
        "0 12 * * *",
        "Australia/Sydney",
        "2026-04-03T12:00:00Z",
        ["2026-04-04T12:00:00+11:00", "2026-04-05T12:00:00+10:00", "2026-04-06T12:00:00+10:00"],
    ),
    # --- DST: Europe/Berlin, spring forward 2026-03-29 02:00 CET -> 03:00 CEST --------
    (
        "berlin-spring-0230-shifted",
        "30 2 * * *",
        BERLIN,
        "2026-03-27T12:00:00Z",
        ["2026-03-28T02:30:00+01:00", "2026-03-29T03:30:00+02:00", "2026-03-30T02:30:00+02:00"],
    ),
    (
        "berlin-spring-0200-shifted",
        "0 2 * * *",
        BERLIN,
        "2026-03-27T12:00:00Z",
        ["2026-03-28T02:00:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"],
    ),
    (
        "berlin-spring-0300",
        "0 3 * * *",
        BERLIN,
        "2026-03-28T12:00:00Z",
        ["2026-03-29T03:00:00+02:00", "2026-03-30T03:00:00+02:00"],
    ),
    (
        "berlin-spring-midnight",
        "0 0 * * *",
        BERLIN,
        "2026-03-28T12:00:00Z",
        ["2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00"],
    ),
    (
        "berlin-spring-monthly",
        "@monthly",
        BERLIN,
        "2026-02-15T00:00:00Z",
        ["2026-03-01T00:00:00+01:00", "2026-04-01T00:00:00+02:00", "2026-05-01T00:00:00+02:00"],
    ),
    (
        "berlin-spring-weekly",
        "@weekly",
        BERLIN,
        "2026-03-20T00:00:00Z",
        [
            "2026-03-22T00:00:00+01:00",
            "2026-03-29T00:00:00+01:00",
            "2026-04-05T00:00:00+02:00",
            "2026-04-12T00:00:00+02:00",
        ],
    ),
    (
        "berlin-spring-0015-next-day",
        "15 0 * * *",
        BERLIN,
        "2026-03-28T12:00:00Z",
        ["2026-03-29T00:15:00+01:00", "2026-03-30T00:15:00+02:00", "2026-03-31T00:15:00+02:00"],
    ),
    (
        "berlin-spring-hourly",
        "0 * * * *",
        BERLIN,
        "2026-03-29T00:30:00+01:00",
        ["2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00"],
    ),
    (
        "berlin-spring-half-past-hourly",
        "30 * * * *",
        BERLIN,
        "2026-03-29T00:40:00+01:00",
        ["2026-03-29T01:30:00+01:00", "2026-03-29T03:30:00+02:00", "2026-03-29T04:30:00+02:00"],
    ),
    (
        "berlin-spring-every-30-in-hour-2",
        "*/30 2 * * *",
        BERLIN,
        "2026-03-29T00:00:30+01:00",
        ["2026-03-29T03:00:00+02:00", "2026-03-29T03:30:00+02:00", "2026-03-30T02:00:00+02:00"],
    ),
    # --- DST: Europe/Berlin, fall back 2026-10-25 03:00 CEST -> 02:00 CET -------------
    (
        "berlin-fall-0230-once",
        "30 2 * * *",
        BERLIN,
        "2026-10-23T12:00:00Z",
        ["2026-10-24T02:30:00+02:00", "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"],
    ),
    (
        "berlin-fall-0200-once",
        "0 2 * * *",
        BERLIN,
        "2026-10-23T12:00:00Z",
        ["2026-10-24T02:00:00+02:00", "2026-10-25T02:00:00+02:00", "2026-10-26T02:00:00+01:00"],
    ),
    (
        "berlin-fall-0130",
        "30 1 * * *",
        BERLIN,
        "2026-10-24T12:00:00Z",
        ["2026-10-25T01:30:00+02:00", "2026-10-26T01:30:00+01:00"],
    ),
    (
        "berlin-fall-0300",
        "0 3 * * *",
        BERLIN,
        "2026-10-24T12:00:00Z",
        ["2026-10-25T03:00:00+01:00", "2026-10-26T03:00:00+01:00"],
    ),
    (
        "berlin-fall-hourly-both",
        "0 * * * *",
        BERLIN,
        "2026-10-25T00:30:00+02:00",
        [
            "2026-10-25T01:00:00+02:00",
            "2026-10-25T02:00:00+02:00",
            "2026-10-25T02:00:00+01:00",
            "2026-10-25T03:00:00+01:00",
            "2026-10-25T04:00:00+01:00",
        ],
    ),
    (
        "berlin-fall-quarter-past-hourly",
        "15 * * * *",
        BERLIN,
        "2026-10-25T01:00:00+02:00",
        [
            "2026-10-25T01:15:00+02:00",
            "2026-10-25T02:15:00+02:00",
            "2026-10-25T02:15:00+01:00",
            "2026-10-25T03:15:00+01:00",
        ],
    ),
    (
        "berlin-fall-every-30-in-hour-2",
        "*/30 2 * * *",
        BERLIN,
        "2026-10-25T00:00:30+02:00",
        ["2026-10-25T02:00:00+02:00", "2026-10-25T02:30:00+02:00", "2026-10-26T02:00:00+01:00"],
    ),
    # --- DST: America/New_York, 2026-03-08 02:00 EST -> 03:00 EDT;
    #     2026-11-01 02:00 EDT -> 01:00 EST
    (
        "ny-spring-0230-shifted",
        "30 2 * * *",
        NEW_YORK,
        "2026-03-07T12:00:00Z",
        ["2026-03-08T03:30:00-04:00", "2026-03-09T02:30:00-04:00"],
    ),
    (
        "ny-spring-midnight",
        "0 0 * * *",
        NEW_YORK,
        "2026-03-07T12:00:00Z",
        ["2026-03-08T00:00:00-05:00", "2026-03-09T00:00:00-04:00", "2026-03-10T00:00:00-04:00"],
    ),
    (
        "ny-spring-hourly",
        "0 * * * *",
        NEW_YORK,
        "2026-03-08T00:30:00-05:00",
        ["2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-08T04:00:00-04:00"],
    ),
    (
        "ny-spring-weekly-sunday-0200",
        "0 2 * * 0",
        NEW_YORK,
        "2026-03-01T12:00:00Z",
        ["2026-03-08T03:00:00-04:00", "2026-03-15T02:00:00-04:00"],
    ),
    (
        "ny-fall-0130-once",
        "30 1 * * *",
        NEW_YORK,
        "2026-10-31T12:00:00Z",
        ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
    ),
    (
        "ny-fall-hourly-both",
        "0 * * * *",
        NEW_YORK,
        "2026-11-01T00:30:00-04:00",
        ["2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T02:00:00-05:00"],
    ),
    (
        "ny-fall-every-30-in-hour-1",
        "*/30 1 * * *",
        NEW_YORK,
        "2026-11-01T00:00:30-04:00",
        ["2026-11-01T01:00:00-04:00", "2026-11-01T01:30:00-04:00", "2026-11-02T01:00:00-05:00"],
    ),
    (
        "ny-fall-weekly-sunday-0100",
        "0 1 * * 0",
        NEW_YORK,
        "2026-10-31T12:00:00Z",
        ["2026-11-01T01:00:00-04:00", "2026-11-08T01:00:00-05:00"],
    ),
    (
        "ny-fall-0200",
        "0 2 * * *",
        NEW_YORK,
        "2026-10-31T12:00:00Z",
        ["2026-11-01T02:00:00-05:00", "2026-11-02T02:00:00-05:00"],
    ),
]

DST_ZONES = {BERLIN, NEW_YORK, "Australia/Sydney"}


def _instant(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    assert value.tzinfo is not None
    return value


def _utc(values: list[datetime]) -> list[datetime]:
    return [v.astimezone(UTC) for v in values]


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 60
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("expression", "zone", "start", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_fire_times(expression: str, zone: str, start: str, expected: list[str]) -> None:
    trigger = StandardCronTrigger(expression, ZoneInfo(zone))
    got = list(trigger.fire_times(_instant(start), len(expected)))
    want = [_instant(text) for text in expected]
    # Compare as instants. (Normalised to UTC first: Python never calls an inter-zone
    # comparison equal when one side sits in a DST fold, PEP 495.)
    assert _utc(got) == _utc(want), [g.isoformat() for g in got]
    for value in got:
        assert value.tzinfo is not None
    assert all(a < b for a, b in zip(_utc(got), _utc(got)[1:], strict=False))
    if zone in DST_ZONES:
        # The offset each fire is shown with is the zone's real offset at that instant.
        assert [g.utcoffset() for g in got] == [w.utcoffset() for w in want]


@pytest.mark.parametrize(
    ("expression", "zone", "start", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES[:20]],
)
def test_get_next_fire_time_chain_matches_table(
    expression: str, zone: str, start: str, expected: list[str]
) -> None:
    """The APScheduler protocol itself (previous, now) walks the same slots."""
    trigger = StandardCronTrigger(expression, ZoneInfo(zone))
    now = _instant(start)
    previous = None
    for text in expected:
        nxt = trigger.get_next_fire_time(previous, now)
        assert nxt is not None
        assert nxt.astimezone(UTC) == _instant(text).astimezone(UTC)
        previous = now = nxt


def test_cron_prefix_zone_through_parse_job() -> None:
    spec = parse_job({"subject": "a.b", "schedule": {"cron": "CRON_TZ=Europe/Berlin 30 2 * * *"}})
    trigger = spec.trigger(datetime(2026, 3, 27, 12, tzinfo=UTC))
    got = _utc(list(trigger.fire_times(datetime(2026, 3, 27, 12, tzinfo=UTC), 3)))
    assert got == _utc(
        [
            _instant("2026-03-28T02:30:00+01:00"),
            _instant("2026-03-29T03:30:00+02:00"),
            _instant("2026-03-30T02:30:00+02:00"),
        ]
    )


def test_start_and_end_date_bound_the_fires() -> None:
    start = _instant("2026-01-05T00:00:00Z")
    end = _instant("2026-01-07T00:00:00Z")
    trigger = StandardCronTrigger("0 12 * * *", UTC, start_date=start, end_date=end)
    got = list(trigger.fire_times(_instant("2026-01-01T00:00:00Z"), 10))
    assert got == [_instant("2026-01-05T12:00:00Z"), _instant("2026-01-06T12:00:00Z")]


def test_pickle_round_trip_keeps_schedule() -> None:
    trigger = StandardCronTrigger("0 12 13 * 5", ZoneInfo(BERLIN))
    copy = pickle.loads(pickle.dumps(trigger))
    now = _instant("2026-04-01T00:00:00Z")
    assert _utc(list(copy.fire_times(now, 5))) == _utc(list(trigger.fire_times(now, 5)))
    assert copy.expression == "0 12 13 * 5"


def test_never_matching_date_yields_nothing() -> None:
    trigger = StandardCronTrigger("0 0 30 2 *", UTC)
    assert list(trigger.fire_times(_instant("2026-01-01T00:00:00Z"), 1)) == []


def test_sunday_forms_are_equivalent() -> None:
    forms = ["0", "7", "SUN", "sun", "Sun", "0,7", "7-7"]
    specs = {parse_cron(f"0 0 * * {form}").weekdays for form in forms}
    assert len(specs) == 1


# --- DST: a daily job fires exactly once on each change day ---------------------------

CHANGE_DAYS = [
    (BERLIN, date(2026, 3, 29)),
    (BERLIN, date(2026, 10, 25)),
    (NEW_YORK, date(2026, 3, 8)),
    (NEW_YORK, date(2026, 11, 1)),
]


def _fires_on_local_date(expression: str, zone_name: str, day: date) -> list[datetime]:
    zone = ZoneInfo(zone_name)
    trigger = StandardCronTrigger(expression, zone)
    # Start well before the day (its local midnight minus 2 hours, as an instant).
    start = datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC) - timedelta(hours=2)
    fires = list(trigger.fire_times(start, 4))
    return [f for f in fires if f.astimezone(zone).date() == day]


@pytest.mark.parametrize(("zone", "day"), CHANGE_DAYS, ids=[f"{z}-{d}" for z, d in CHANGE_DAYS])
def test_daily_job_fires_exactly_once_on_change_day(zone: str, day: date) -> None:
    for hour in range(24):
        for minute in (0, 1, 30, 59):
            expression = f"{minute} {hour} * * *"
            fires = _fires_on_local_date(expression, zone, day)
            assert len(fires) == 1, (expression, [f.isoformat() for f in fires])


@pytest.mark.parametrize(("zone", "day"), CHANGE_DAYS, ids=[f"{z}-{d}" for z, d in CHANGE_DAYS])
def test_daily_descriptor_and_seconds_form_fire_once_on_change_day(zone: str, day: date) -> None:
    for expression in ("@daily", "@midnight", "0 30 2 * * *", "15 30 1 * * *", "0 0 2 * * ?"):
        fires = _fires_on_local_date(expression, zone, day)
        assert len(fires) == 1, (expression, [f.isoformat() for f in fires])


@pytest.mark.parametrize(("zone", "day"), CHANGE_DAYS, ids=[f"{z}-{d}" for z, d in CHANGE_DAYS])
def test_daily_job_fires_once_every_day_around_change(zone: str, day: date) -> None:
    """No day is skipped or doubled: two days before the change to three days after."""
    tz = ZoneInfo(zone)
    first = day - timedelta(days=2)
    start = datetime(first.year, first.month, first.day, tzinfo=tz).astimezone(UTC) - timedelta(
        seconds=1
    )
    want = [first + timedelta(days=k) for k in range(6)]
    wrong = {}
    for hour in range(24):
        for minute in (0, 30, 59):
            expression = f"{minute} {hour} * * *"
            fires = StandardCronTrigger(expression, tz).fire_times(start, 6)
            dates = [f.astimezone(tz).date() for f in fires]
            if dates != want:
                wrong[expression] = [str(d) for d in dates]
    assert wrong == {}


@pytest.mark.parametrize(
    ("zone", "day", "hours_that_day"),
    [
        (BERLIN, date(2026, 3, 29), 23),
        (BERLIN, date(2026, 10, 25), 25),
        (NEW_YORK, date(2026, 3, 8), 23),
        (NEW_YORK, date(2026, 11, 1), 25),
    ],
)
def test_hourly_job_fires_every_real_hour_on_change_day(
    zone: str, day: date, hours_that_day: int
) -> None:
    tz = ZoneInfo(zone)
    trigger = StandardCronTrigger("0 * * * *", tz)
    start = datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC) - timedelta(
        minutes=30
    )
    fires = _utc([f for f in trigger.fire_times(start, 30) if f.astimezone(tz).date() == day])
    assert len(fires) == hours_that_day
    # One hour apart, as instants, all day long.
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(fires))


# --- errors ------------------------------------------------------------------------------

ERRORS: list[tuple[str, str, list[str]]] = [
    # (id, expression, words that must all appear in the message, case-insensitive)
    ("empty", "", ["field"]),
    ("blank", "   ", ["field"]),
    ("four-fields", "* * * *", ["field", "4"]),
    ("one-field", "*", ["field", "1"]),
    ("seven-fields", "* * * * * * *", ["field", "7"]),
    ("minute-60", "60 * * * *", ["minute", "60", "range"]),
    ("hour-24", "0 24 * * *", ["hour", "24", "range"]),
    ("dom-0", "0 0 0 * *", ["day-of-month", "0", "range"]),
    ("dom-32", "0 0 32 * *", ["day-of-month", "32", "range"]),
    ("month-0", "0 0 1 0 *", ["month", "0", "range"]),
    ("month-13", "0 0 1 13 *", ["month", "13", "range"]),
    ("dow-8", "0 0 * * 8", ["day-of-week", "8", "range"]),
    ("second-60", "60 0 0 * * *", ["second", "60", "range"]),
    ("range-end-out", "0 0 1-32 * *", ["32", "range"]),
    ("backwards-minutes", "5-1 * * * *", ["minute", "5-1", "backwards"]),
    ("backwards-months", "0 0 1 DEC-JAN *", ["month", "backwards"]),
    ("backwards-days", "0 0 * * FRI-MON", ["day-of-week", "backwards"]),
    ("step-zero", "*/0 * * * *", ["step"]),
    ("range-step-zero", "0 1-5/0 * * *", ["step"]),
    ("step-negative", "*/-1 * * * *", ["step"]),
    ("step-not-number", "*/x * * * *", ["step"]),
    ("step-empty", "*/ * * * *", ["step"]),
    ("bad-month-name", "0 0 1 FOO *", ["month", "FOO"]),
    ("full-day-name", "0 0 * * MONDAY", ["day-of-week", "MONDAY"]),
    ("day-name-in-month", "0 0 1 MON *", ["month", "MON"]),
    ("month-name-in-dow", "0 0 * * JAN", ["day-of-week", "JAN"]),
    ("name-in-minute", "MON * * * *", ["minute", "MON"]),
    ("letter-L", "0 0 L * *", ["day-of-month", "L"]),
    ("hash-nth-weekday", "0 0 * * 5#3", ["day-of-week"]),
    ("negative-number", "-5 * * * *", ["minute"]),
    ("double-dash", "1-2-3 * * * *", ["minute"]),
    ("unicode-digit", "\u0663 * * * *", ["minute"]),
    ("empty-list-item", "1,,2 * * * *", ["minute", "empty"]),
    ("trailing-comma", "0 1, * * *", ["hour", "empty"]),
    ("leading-comma", "0 0 ,1 * *", ["day-of-month", "empty"]),
    ("unknown-descriptor", "@fortnightly", ["descriptor", "@fortnightly"]),
    ("reboot-descriptor", "@reboot", ["descriptor"]),
    ("bare-at", "@", ["descriptor"]),
    ("descriptor-with-fields", "@daily 0 0", ["descriptor"]),
    ("every-descriptor", "@every 1h", ["descriptor"]),
]


@pytest.mark.parametrize(("expression", "words"), [pytest.param(e, w, id=i) for i, e, w in ERRORS])
def test_cron_errors(expression: str, words: list[str]) -> None:
    with pytest.raises(SpecError) as caught:
        StandardCronTrigger(expression, UTC)
    message = str(caught.value)
    assert message.startswith("schedule.cron: ")
    assert caught.value.field == "schedule.cron"
    for word in words:
        assert word.lower() in message.lower(), (word, message)


@pytest.mark.parametrize(
    ("expression", "words"),
    # `@every 1h` is no cron expression, but a job document takes it as an interval
    # (robfig's descriptor; tests/test_spec.py).
    [pytest.param(e, w, id=i) for i, e, w in ERRORS if i != "every-descriptor"],
)
def test_cron_errors_through_parse_job(expression: str, words: list[str]) -> None:
    doc = {"target": {"subject": "a.b"}, "schedule": {"cron": expression}}
    with pytest.raises(SpecError) as caught:
        parse_job(doc)
    assert str(caught.value).startswith("schedule.cron: ")
    assert re.search(r"\S", caught.value.rule)
