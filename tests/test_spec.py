"""The job document (SPEC §2): parse_job, its small parsers, EveryTrigger, and a fuzz of
the whole parser (it returns a JobSpec or raises SpecError, nothing else)."""

from __future__ import annotations

import base64
import copy
import json
import pickle
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nats_apscheduler.errors import SpecError
from nats_apscheduler.modes import DeliverySpec, RetrySpec
from nats_apscheduler.spec import (
    HEADER_RESERVE,
    EveryTrigger,
    JobSpec,
    delivery_of,
    parse_duration,
    parse_job,
    parse_timezone,
    validate_subject,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ULID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


def doc(schedule: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "target": {"subject": "database.cleanup"},
        "schedule": schedule if schedule is not None else {"cron": "0 2 * * *"},
    }
    out.update(extra)
    return out


def parse(document: Any, **kwargs: Any) -> JobSpec:
    kwargs.setdefault("now", NOW)
    return parse_job(document, **kwargs)


def spec_error(document: Any, **kwargs: Any) -> SpecError:
    kwargs.setdefault("now", NOW)
    with pytest.raises(SpecError) as caught:
        parse_job(document, **kwargs)
    assert str(caught.value)
    return caught.value


def ulid_millis(text: str) -> int:
    """Decode the 48-bit millisecond timestamp of a ULID (first 10 characters)."""
    value = 0
    for char in text[:10]:
        value = value * 32 + CROCKFORD.index(char)
    return value


def millis(value: datetime) -> int:
    return (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


# --- README schema and Go v0.2 flat form --------------------------------------------------


def test_readme_example() -> None:
    spec = parse(
        {
            "target": {"subject": "database.cleanup"},
            "payload": {"type": "json", "data": '{"table":"user_sessions"}'},
            "schedule": {"cron": "0 2 * * *"},
        }
    )
    assert spec.subject == "database.cleanup"
    assert spec.kind == "cron"
    assert spec.cron == "0 2 * * *"
    assert spec.timezone == "UTC"
    assert spec.payload_type == "json"
    assert spec.payload(NOW) == b'{"table":"user_sessions"}'
    assert spec.paused is False
    assert spec.every is None and spec.at is None


@pytest.mark.parametrize(
    ("document", "kind"),
    [
        (
            {
                "target": {"subject": "my.app.task"},
                "payload": {"data": "Hello World"},
                "schedule": {"every": "30s"},
            },
            "every",
        ),
        (
            {
                "target": {"subject": "reports.weekly"},
                "payload": {"data": '{"type":"sales","recipients":["team@company.com"]}'},
                "schedule": {"cron": "0 9 * * MON"},
            },
            "cron",
        ),
        (
            {
                "target": {"subject": "cache.warmup"},
                "payload": {"data": '{"keys":["popular_products","categories"]}'},
                "schedule": {"every": "15m"},
            },
            "every",
        ),
        (
            {
                "target": {"subject": "notifications.send"},
                "payload": {"type": "json", "data": '{"message":"hello world"}'},
                "schedule": {"every": "30s"},
            },
            "every",
        ),
    ],
)
def test_readme_documents(document: dict[str, Any], kind: str) -> None:
    spec = parse(document)
    assert spec.kind == kind
    assert spec.subject == document["target"]["subject"]
    assert spec.payload(NOW) == document["payload"]["data"].encode()


def test_go_flat_form() -> None:
    spec = parse({"subject": "my.app.task", "schedule": {"every": "30s"}})
    assert spec.subject == "my.app.task"
    assert spec.every == timedelta(seconds=30)
    assert spec.payload_data is None
    assert ULID_RE.fullmatch(spec.payload(NOW).decode())


def test_go_flat_form_equals_readme_form() -> None:
    flat = parse({"subject": "a.b", "schedule": {"cron": "*/5 * * * *"}})
    nested = parse({"target": {"subject": "a.b"}, "schedule": {"cron": "*/5 * * * *"}})
    assert flat == nested


def test_flat_and_nested_subject_conflict_is_an_error() -> None:
    spec_error({"subject": "a.b", "target": {"subject": "c.d"}, "schedule": {"every": "1m"}})


@pytest.mark.parametrize("document", [None, [], "a.b", 5, 1.5, True, ["subject", "a"]])
def test_document_must_be_an_object(document: Any) -> None:
    spec_error(document)


def test_missing_target_and_schedule() -> None:
    assert "target" in str(spec_error({"schedule": {"every": "1m"}}))
    assert "schedule" in str(spec_error({"target": {"subject": "a.b"}}))
    assert "subject" in str(spec_error({"target": {}, "schedule": {"every": "1m"}}))


@pytest.mark.parametrize(
    "schedule",
    [
        {},
        {"every": "1m", "cron": "* * * * *"},
        {"cron": "* * * * *", "at": "2030-01-01T00:00:00Z"},
        {"every": "1m", "at": "2030-01-01T00:00:00Z"},
        {"timezone": "UTC"},
    ],
)
def test_exactly_one_schedule_kind(schedule: dict[str, Any]) -> None:
    error = spec_error(doc(schedule))
    assert str(error).startswith("schedule")


@pytest.mark.parametrize(
    "document",
    [
        doc(foo=1),
        doc({"cron": "* * * * *", "foo": 1}),
        {"target": {"subject": "a.b", "foo": 1}, "schedule": {"every": "1m"}},
        {
            "target": {"subject": "a.b"},
            "payload": {"data": "x", "foo": 1},
            "schedule": {"every": "1m"},
        },
        {"subject": "a.b", "schedule": {"every": "1m"}, "foo": 1},
    ],
)
def test_unknown_fields_rejected(document: dict[str, Any]) -> None:
    assert "foo" in str(spec_error(document))


def test_typo_field_rejected() -> None:
    assert "schedul" in str(spec_error({"target": {"subject": "a.b"}, "schedul": {"every": "1m"}}))


@pytest.mark.parametrize(
    "document",
    [
        {"target": {"subject": 5}, "schedule": {"every": "1m"}},
        {"target": "a.b", "schedule": {"every": "1m"}},
        {"target": {"subject": "a.b"}, "schedule": "0 * * * *"},
        doc({"every": 60}),
        doc({"cron": ["*", "*", "*", "*", "*"]}),
        doc({"at": 1767225600}),
        doc({"cron": "* * * * *", "timezone": 1}),
        doc({"cron": "* * * * *", "paused": "yes"}),
        doc({"cron": "* * * * *"}, paused="true"),
        doc({"cron": "* * * * *", "jitter": 5}),
        {"target": {"subject": "a.b"}, "payload": "hello", "schedule": {"every": "1m"}},
        {
            "target": {"subject": "a.b"},
            "payload": {"type": 1, "data": "x"},
            "schedule": {"every": "1m"},
        },
    ],
)
def test_wrong_types_rejected(document: dict[str, Any]) -> None:
    spec_error(document)


# --- read-only run state --------------------------------------------------------------------

RUN_STATE = {
    "next_run": "2026-01-02T02:00:00Z",
    "last_run": {"scheduled": "2026-01-01T02:00:00Z", "actual": "2026-01-01T02:00:00.120Z"},
    "run_count": 17,
    "last_error": None,
}


def test_read_only_fields_accepted_and_ignored() -> None:
    plain = parse(doc())
    assert parse({**doc(), **RUN_STATE}) == plain
    assert parse({**doc(), **RUN_STATE, "last_error": "boom", "run_count": "x"}) == plain


def test_read_only_fields_in_flat_form() -> None:
    plain = parse({"subject": "a.b", "schedule": {"every": "1m"}})
    assert parse({"subject": "a.b", "schedule": {"every": "1m"}, **RUN_STATE}) == plain


def test_get_reply_can_be_sent_back() -> None:
    spec = parse(doc({"cron": "CRON_TZ=Europe/Berlin 0 9 * * 1-5", "jitter": "10s"}))
    reply = {**spec.to_document(), **RUN_STATE, "paused": False}
    assert parse(reply) == spec


# --- payload ------------------------------------------------------------------------------


def with_payload(payload: Any) -> dict[str, Any]:
    return {"target": {"subject": "a.b"}, "payload": payload, "schedule": {"every": "1m"}}


@pytest.mark.parametrize(
    ("payload", "body"),
    [
        ({"type": "json", "data": '{"a": [1, 2, {"b": null}]}'}, b'{"a": [1, 2, {"b": null}]}'),
        ({"type": "json", "data": "42"}, b"42"),
        ({"type": "json", "data": '"text"'}, b'"text"'),
        ({"type": "json", "data": ' {"spaced":true} '}, b' {"spaced":true} '),
        ({"type": "json", "data": '{"k":"h\\u00e9"}'}, b'{"k":"h\\u00e9"}'),
        ({"type": "text", "data": "hello world"}, b"hello world"),
        ({"type": "text", "data": "héllo wörld ✓ 日本"}, "héllo wörld ✓ 日本".encode()),
        ({"type": "text", "data": "{not json"}, b"{not json"),
        ({"type": "base64", "data": "aGVsbG8="}, b"hello"),
        (
            {"type": "base64", "data": base64.b64encode(bytes(range(256))).decode()},
            bytes(range(256)),
        ),
        ({"data": '{"verbatim":1}'}, b'{"verbatim":1}'),
        ({"data": "plain words, not JSON"}, b"plain words, not JSON"),
        ({"data": "ünïcode"}, "ünïcode".encode()),
        ({"type": None, "data": "x"}, b"x"),
    ],
)
def test_payload_bodies(payload: dict[str, Any], body: bytes) -> None:
    assert parse(with_payload(payload)).payload(NOW) == body


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"type": "json", "data": "{"}, "payload.data"),
        ({"type": "json", "data": "{'a': 1}"}, "payload.data"),
        ({"type": "json", "data": "hello"}, "payload.data"),
        ({"type": "base64", "data": "not base64!!"}, "payload.data"),
        ({"type": "base64", "data": "aGVsbG8"}, "payload.data"),
        ({"type": "base64", "data": "héllo=="}, "payload.data"),
        ({"type": "xml", "data": "<a/>"}, "payload.type"),
        ({"type": "JSON", "data": "{}"}, "payload.type"),
        ({"type": "text", "data": 5}, "payload.data"),
        ({"type": "text", "data": ["a"]}, "payload.data"),
        ({"data": {"a": 1}}, "payload.data"),
    ],
)
def test_payload_errors(payload: dict[str, Any], field: str) -> None:
    error = spec_error(with_payload(payload))
    assert str(error).startswith(field), str(error)


@pytest.mark.parametrize(
    "document",
    [
        {"target": {"subject": "a.b"}, "schedule": {"every": "1m"}},
        with_payload(None),
        with_payload({}),
        with_payload({"data": ""}),
        with_payload({"type": "text", "data": ""}),
        with_payload({"type": "json", "data": ""}),
        with_payload({"type": "base64", "data": ""}),
        with_payload({"type": "json"}),
    ],
)
def test_missing_or_empty_payload_is_a_ulid_of_the_fire_time(document: dict[str, Any]) -> None:
    spec = parse(document)
    fire = datetime(2026, 3, 4, 5, 6, 7, 891234, tzinfo=UTC)
    body = spec.payload(fire).decode("ascii")
    assert ULID_RE.fullmatch(body), body
    assert ulid_millis(body) == millis(fire) == 1772600767891
    # A fresh ULID per fire: same millisecond, different random part.
    assert spec.payload(fire).decode() != body


def test_ulid_of_a_fire_time_in_another_zone() -> None:
    spec = parse({"subject": "a.b", "schedule": {"every": "1m"}})
    fire = datetime(2026, 7, 1, 9, 30, tzinfo=timezone(timedelta(hours=2)))
    body = spec.payload(fire).decode()
    assert ulid_millis(body) == millis(fire)
    later = spec.payload(fire + timedelta(milliseconds=1)).decode()
    assert ulid_millis(later) == millis(fire) + 1


def test_max_payload_enforced_on_bytes() -> None:
    """The body plus the fire's headers must fit: HEADER_RESERVE + 3 x subject is kept free."""
    subject = with_payload({"data": "x"})["target"]["subject"]
    reserve = HEADER_RESERVE + 3 * len(subject)
    text = with_payload({"type": "text", "data": "x" * 100})
    assert parse(text, max_payload=100 + reserve).payload(NOW) == b"x" * 100
    error = spec_error(text, max_payload=99 + reserve)
    assert str(error).startswith("payload.data")
    assert "max_payload" in str(error) and str(99 + reserve) in str(error)
    # Counted in bytes after encoding: 50 x "é" is 100 UTF-8 bytes.
    unicode = with_payload({"type": "text", "data": "é" * 50})
    parse(unicode, max_payload=100 + reserve)
    spec_error(unicode, max_payload=99 + reserve)
    # base64 counts the decoded bytes.
    b64 = with_payload({"type": "base64", "data": "aGVsbG8="})
    parse(b64, max_payload=5 + reserve)
    spec_error(b64, max_payload=4 + reserve)
    json_doc = with_payload({"type": "json", "data": '{"a":1}'})
    parse(json_doc, max_payload=7 + reserve)
    spec_error(json_doc, max_payload=6 + reserve)
    untyped = with_payload({"data": "abc"})
    parse(untyped, max_payload=3 + reserve)
    spec_error(untyped, max_payload=2 + reserve)


# --- subjects -----------------------------------------------------------------------------

VALID_SUBJECTS = [
    "a",
    "database.cleanup",
    "orders.eu-west.v2",
    "a.b-c_d/e=f.G9",
    "UPPER.lower.123",
    "nats-cronx.jobs",
    "nats-cron-other.jobs",
    "jobs.nats-cron.list",
    "x" * 100,
]


@pytest.mark.parametrize("subject", VALID_SUBJECTS)
def test_valid_subjects(subject: str) -> None:
    assert validate_subject(subject) == subject
    assert parse({"subject": subject, "schedule": {"every": "1m"}}).subject == subject


INVALID_SUBJECTS = [
    ("", ["empty"]),
    ("*", ["wildcard"]),
    (">", ["wildcard"]),
    ("orders.*", ["wildcard"]),
    ("orders.>", ["wildcard"]),
    ("orders.*.created", ["wildcard"]),
    ("a*b", []),
    ("a.b>", []),
    ("$JS.API.STREAM.CREATE.x", ["$"]),
    ("$SYS.REQ.SERVER.PING", ["$"]),
    ("$KV.bucket.key", ["$"]),
    ("$", ["$"]),
    ("nats-cron.jobs.list", ["nats-cron"]),
    ("nats-cron.jobs.delete.pattern", ["nats-cron"]),
    ("nats-cron.status", ["nats-cron"]),
    (".a", ["empty"]),
    ("a.", ["empty"]),
    ("a..b", ["empty"]),
    (".", ["empty"]),
    ("a b", ["space"]),
    (" a", []),
    ("a ", []),
    ("a\tb", []),
    ("a.b\n", []),
    ("a\x00b", []),
    ("ä.b", []),
    ("a,b", []),
    ("a:b", []),
    ("a#b", []),
    ("a@b", []),
    ("a\\b", []),
    ("émoji.🙂", []),
]


@pytest.mark.parametrize(("subject", "words"), INVALID_SUBJECTS)
def test_invalid_subjects(subject: str, words: list[str]) -> None:
    with pytest.raises(SpecError) as caught:
        validate_subject(subject)
    assert caught.value.field == "target.subject"
    for word in words:
        assert word in str(caught.value), str(caught.value)
    error = spec_error({"target": {"subject": subject}, "schedule": {"every": "1m"}})
    assert str(error).startswith("target.subject: ")
    flat = spec_error({"subject": subject, "schedule": {"every": "1m"}})
    assert "subject" in str(flat)


# --- every: Go duration grammar -----------------------------------------------------------

SMALL = timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300ms", timedelta(milliseconds=300)),
        ("30s", timedelta(seconds=30)),
        ("1s", timedelta(seconds=1)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("1h30m", timedelta(minutes=90)),
        ("1.5h", timedelta(minutes=90)),
        ("2h45m30.5s", timedelta(hours=2, minutes=45, seconds=30, milliseconds=500)),
        (".5s", timedelta(milliseconds=500)),
        ("1.s", timedelta(seconds=1)),
        ("+5s", timedelta(seconds=5)),
        ("2µs", timedelta(microseconds=2)),  # U+00B5 micro sign
        ("2μs", timedelta(microseconds=2)),  # U+03BC Greek mu
        ("2us", timedelta(microseconds=2)),
        ("3000ns", timedelta(microseconds=3)),
        ("1m30s250ms", timedelta(seconds=90, milliseconds=250)),
        ("24h", timedelta(days=1)),
        ("168h", timedelta(days=7)),
        ("0.25m", timedelta(seconds=15)),
        ("1h1h", timedelta(hours=2)),
    ],
)
def test_every_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text, "schedule.every") == expected
    spec = parse(doc({"every": text}), min_interval=SMALL)
    assert spec.every == expected
    assert spec.kind == "every"
    assert spec.every_text == text


def test_every_unit_d_rejected_with_exact_message() -> None:
    error = spec_error(doc({"every": "1d"}))
    assert str(error) == 'schedule.every: "1d": unknown unit "d" (use ns, us, ms, s, m, h)'


@pytest.mark.parametrize(
    "text",
    [
        "",
        "5",
        "s",
        "abc",
        "1w",
        "5 s",
        " 5s",
        "5s ",
        "1H",
        "1S",
        "1hour",
        "1sec",
        "1.2.3s",
        "1h-1m",
        "1m30",
        "--1s",
        "+-1s",
        "1e3s",
        "1,5h",
        ".s",
        "1h 30m",
        "٣s",
        "99999999999999999h",
    ],
)
def test_every_malformed(text: str) -> None:
    error = spec_error(doc({"every": text}), min_interval=SMALL)
    assert str(error).startswith("schedule.every: ")
    with pytest.raises(SpecError):
        parse_duration(text, "schedule.every")


@pytest.mark.parametrize("text", ["0", "0s", "0ms", "0.0h", "-0s", "-1s", "-1h30m", "-0.5s"])
def test_every_zero_and_negative_rejected(text: str) -> None:
    error = spec_error(doc({"every": text}), min_interval=timedelta(0))
    assert str(error).startswith("schedule.every: ")
    error = spec_error(doc({"every": text}))
    assert str(error).startswith("schedule.every: ")


def test_every_minimum_interval_default_1s() -> None:
    assert parse(doc({"every": "1s"})).every == timedelta(seconds=1)
    assert parse(doc({"every": "1000ms"})).every == timedelta(seconds=1)
    for text in ("999ms", "300ms", "500us", "1us"):
        error = spec_error(doc({"every": text}))
        assert str(error).startswith("schedule.every: ")
        assert "minimum" in str(error)
        assert text in str(error)
        assert "1s" in str(error)


@pytest.mark.parametrize("text", ["1ns", "999ns"])
def test_every_positive_sub_microsecond_is_below_minimum(text: str) -> None:
    """1ns is a positive Go duration: the error is the minimum interval, not "positive"."""
    error = spec_error(doc({"every": text}))
    assert str(error).startswith("schedule.every: ")
    assert "minimum" in str(error), str(error)


def test_every_minimum_interval_configurable() -> None:
    minute = timedelta(minutes=1)
    for ok in ("1m", "60s", "1h", "0.5h"):
        assert parse(doc({"every": ok}), min_interval=minute).every >= minute
    for low in ("59s", "59.999s", "30s", "1s"):
        error = spec_error(doc({"every": low}), min_interval=minute)
        assert "minimum" in str(error) and "1m" in str(error)
    fast = timedelta(milliseconds=100)
    assert parse(doc({"every": "300ms"}), min_interval=fast).every == timedelta(milliseconds=300)
    assert parse(doc({"every": "100ms"}), min_interval=fast).every == fast
    assert "minimum" in str(spec_error(doc({"every": "99ms"}), min_interval=fast))


# --- time zones -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "zone", "cron"),
    [
        ({"cron": "0 9 * * *"}, "UTC", "0 9 * * *"),
        ({"cron": "CRON_TZ=Europe/Berlin 0 9 * * *"}, "Europe/Berlin", "0 9 * * *"),
        ({"cron": "TZ=America/New_York 0 9 * * *"}, "America/New_York", "0 9 * * *"),
        ({"cron": "  CRON_TZ=Asia/Tokyo   30 7 * * 1-5  "}, "Asia/Tokyo", "30 7 * * 1-5"),
        ({"cron": "CRON_TZ=Europe/Berlin @daily"}, "Europe/Berlin", "@daily"),
        ({"cron": "0 9 * * *", "timezone": "Asia/Tokyo"}, "Asia/Tokyo", "0 9 * * *"),
        ({"cron": "TZ=UTC 0 9 * * *", "timezone": "UTC"}, "UTC", "0 9 * * *"),
        (
            {"cron": "CRON_TZ=Europe/Berlin 0 9 * * *", "timezone": "Europe/Berlin"},
            "Europe/Berlin",
            "0 9 * * *",
        ),
    ],
)
def test_cron_zone(schedule: dict[str, Any], zone: str, cron: str) -> None:
    spec = parse(doc(schedule))
    assert spec.timezone == zone
    assert spec.cron == cron


def test_cron_zone_applies_to_fire_times() -> None:
    spec = parse(doc({"cron": "CRON_TZ=Europe/Berlin 0 9 * * *"}))
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    first = spec.trigger(now).get_next_fire_time(None, now)
    assert first == datetime(2026, 1, 2, 8, tzinfo=UTC)
    spec = parse(doc({"cron": "0 9 * * *", "timezone": "America/New_York"}))
    first = spec.trigger(now).get_next_fire_time(None, now)
    assert first == datetime(2026, 1, 1, 14, tzinfo=UTC)


def test_zone_conflict_is_an_error() -> None:
    error = spec_error(
        doc({"cron": "CRON_TZ=Europe/Berlin 0 9 * * *", "timezone": "America/New_York"})
    )
    assert error.field in ("schedule.cron", "schedule.timezone")
    assert "conflict" in str(error)


@pytest.mark.parametrize(
    "cron",
    [
        "TZ=Europe/Berlin",
        "CRON_TZ=Europe/Berlin",
        "TZ=Europe/Berlin ",
        "TZ=",
        "CRON_TZ=",
        "TZ= 0 9 * * *",
        "CRON_TZ= 0 9 * * *",
        "TZ=Europe/Berlin0 9 * * *",
        "TZ=Europe/Berlin*/5 * * * *",
        "TZ=Mars/Olympus 0 9 * * *",
        "CRON_TZ=Europe/Berln 0 9 * * *",
        "TZ=../../etc/passwd 0 9 * * *",
        "TZ=/etc/localtime 0 9 * * *",
        "TZ=Europe/Berlin TZ=UTC 0 9 * * *",
        "TZ=Europe/Berlin 0 9 * *",
    ],
)
def test_tz_prefix_errors_are_spec_errors(cron: str) -> None:
    error = spec_error(doc({"cron": cron}))
    assert error.field == "schedule.cron", str(error)


@pytest.mark.parametrize(
    "zone",
    [
        "Mars/Olympus",
        "Europe/Berln",
        "",
        "../../etc/passwd",
        "/etc/localtime",
        "Europe/../UTC",
        "Europe/Berlin\x00",
        "Europe/Berlin ",
        " UTC",
        "x" * 300,
        "Europe\\Berlin",
        "☃",
    ],
)
def test_unknown_zones(zone: str) -> None:
    with pytest.raises(SpecError):
        parse_timezone(zone, "schedule.timezone")
    error = spec_error(doc({"cron": "0 9 * * *", "timezone": zone}))
    assert error.field == "schedule.timezone", str(error)
    error = spec_error(doc({"every": "1m", "timezone": zone}))
    assert error.field == "schedule.timezone", str(error)


@pytest.mark.parametrize(
    "zone",
    [
        "UTC",
        "Europe/Berlin",
        "America/New_York",
        "Etc/GMT+5",
        "Asia/Kolkata",
        "Australia/Lord_Howe",
    ],
)
def test_known_zones(zone: str) -> None:
    assert parse_timezone(zone, "schedule.timezone") is not None
    assert parse(doc({"cron": "0 9 * * *", "timezone": zone})).timezone == zone


# --- cron through parse_job ------------------------------------------------------------------


@pytest.mark.parametrize("cron", ["0 0 30 2 *", "0 0 31 2 *", "0 0 31 4,6,9,11 *", "0 0 0 30 2 ?"])
def test_cron_that_never_fires_is_rejected(cron: str) -> None:
    error = spec_error(doc({"cron": cron}))
    assert str(error).startswith("schedule.cron: ")
    assert "never" in str(error)


@pytest.mark.parametrize("cron", ["0 0 30 2 1", "0 0 29 2 *", "@yearly", "0 0 31 * *"])
def test_rare_crons_are_accepted(cron: str) -> None:
    assert parse(doc({"cron": cron})).cron == cron


# --- at ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "instant"),
    [
        ("2030-01-02T03:04:05Z", datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2030-01-02T03:04:05+02:00", datetime(2030, 1, 2, 1, 4, 5, tzinfo=UTC)),
        ("2030-01-02T03:04:05-05:30", datetime(2030, 1, 2, 8, 34, 5, tzinfo=UTC)),
        ("2030-01-02T03:04:05.123456Z", datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
        ("2030-01-02T03:04:05.5+00:00", datetime(2030, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)),
    ],
)
def test_at_rfc3339(text: str, instant: datetime) -> None:
    spec = parse(doc({"at": text}))
    assert spec.kind == "at"
    assert spec.at == instant
    assert spec.at is not None and spec.at.tzinfo is not None


@pytest.mark.parametrize(
    "text",
    [
        "2030-01-02T03:04:05",
        "2030-01-02",
        "2030-01-02 03:04:05",
        "tomorrow",
        "",
        "now",
        "2030-13-02T03:04:05Z",
        "2030-02-30T03:04:05Z",
        "2030-01-02T25:04:05Z",
        "2030-01-02T03:04:05+25:00",
        "1767225600",
    ],
)
def test_at_malformed_or_naive(text: str) -> None:
    error = spec_error(doc({"at": text}))
    assert str(error).startswith("schedule.at: ")


def test_at_naive_message_names_offset() -> None:
    assert "offset" in str(spec_error(doc({"at": "2030-01-02T03:04:05"})))


def test_at_fires_once() -> None:
    spec = parse(doc({"at": "2030-01-02T03:04:05Z"}))
    trigger = spec.trigger(NOW)
    first = trigger.get_next_fire_time(None, NOW)
    assert first == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert trigger.get_next_fire_time(first, first + timedelta(seconds=1)) is None


# --- refinements: jitter, grace, start, end, paused ------------------------------------------


def test_refinements_parsed() -> None:
    spec = parse(
        doc(
            {
                "every": "1h",
                "jitter": "30s",
                "grace": "2h",
                "start": "2026-02-01T00:00:10Z",
                "end": "2026-03-01T00:00:00+01:00",
            }
        )
    )
    assert spec.jitter == timedelta(seconds=30)
    assert spec.grace == timedelta(hours=2)
    assert spec.start == datetime(2026, 2, 1, 0, 0, 10, tzinfo=UTC)
    assert spec.end == datetime(2026, 2, 28, 23, tzinfo=UTC)
    assert spec.paused is False


def test_refinement_defaults() -> None:
    spec = parse(doc())
    assert spec.jitter == timedelta(0)
    assert spec.grace is None
    assert spec.start is None and spec.end is None
    assert spec.paused is False


@pytest.mark.parametrize(
    ("document", "paused"),
    [
        (doc({"every": "1m", "paused": True}), True),
        (doc({"every": "1m", "paused": False}), False),
        (doc({"every": "1m"}, paused=True), True),
        (doc({"every": "1m"}, paused=False), False),
    ],
)
def test_paused(document: dict[str, Any], paused: bool) -> None:
    assert parse(document).paused is paused


@pytest.mark.parametrize(
    ("schedule", "field"),
    [
        ({"every": "1m", "jitter": "-1s"}, "schedule.jitter"),
        ({"every": "1m", "jitter": "1d"}, "schedule.jitter"),
        ({"every": "1m", "jitter": "soon"}, "schedule.jitter"),
        ({"every": "1m", "grace": "-5m"}, "schedule.grace"),
        ({"every": "1m", "grace": "1 hour"}, "schedule.grace"),
        ({"every": "1m", "start": "2026-01-01T00:00:00"}, "schedule.start"),
        ({"every": "1m", "start": "yesterday"}, "schedule.start"),
        ({"every": "1m", "end": "2026-01-01"}, "schedule.end"),
        (
            {"every": "1m", "start": "2026-02-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"},
            "schedule.end",
        ),
        (
            {"every": "1m", "start": "2026-02-01T00:00:00Z", "end": "2026-02-01T01:00:00+01:00"},
            "schedule.end",
        ),
    ],
)
def test_refinement_errors(schedule: dict[str, Any], field: str) -> None:
    error = spec_error(doc(schedule))
    assert str(error).startswith(field + ": "), str(error)


def test_cron_start_and_end_bound_the_trigger() -> None:
    spec = parse(doc({"cron": "0 12 * * *", "start": "2030-01-01T00:00:00Z"}))
    first = spec.trigger(NOW).get_next_fire_time(None, NOW)
    assert first == datetime(2030, 1, 1, 12, tzinfo=UTC)
    spec = parse(doc({"cron": "0 12 * * *", "end": "2026-01-02T13:00:00Z"}))
    trigger = spec.trigger(NOW)
    first = trigger.get_next_fire_time(None, NOW + timedelta(minutes=1))
    assert first == datetime(2026, 1, 2, 12, tzinfo=UTC)
    assert trigger.get_next_fire_time(first, first) is None


def test_every_start_sets_the_phase_across_restarts() -> None:
    spec = parse(doc({"every": "1h", "start": "2026-01-01T00:00:10Z"}))
    for now in (
        datetime(2026, 3, 5, 12, 34, 56, tzinfo=UTC),
        datetime(2026, 3, 5, 12, 0, 11, tzinfo=UTC),
        datetime(2026, 3, 5, 12, 59, 59, tzinfo=UTC),
    ):
        assert spec.trigger(now).get_next_fire_time(None, now) == datetime(
            2026, 3, 5, 13, 0, 10, tzinfo=UTC
        )
    before = datetime(2025, 12, 1, tzinfo=UTC)
    assert spec.trigger(before).get_next_fire_time(None, before) == datetime(
        2026, 1, 1, 0, 0, 10, tzinfo=UTC
    )


def test_every_end_bounds_the_trigger() -> None:
    spec = parse(
        doc({"every": "1h", "start": "2026-01-01T00:00:00Z", "end": "2026-01-01T02:30:00Z"})
    )
    trigger = spec.trigger(NOW)
    assert trigger.get_next_fire_time(None, datetime(2026, 1, 1, 1, 30, tzinfo=UTC)) == datetime(
        2026, 1, 1, 2, tzinfo=UTC
    )
    assert trigger.get_next_fire_time(None, datetime(2026, 1, 1, 2, 0, 1, tzinfo=UTC)) is None


# --- to_document round trips -------------------------------------------------------------------

ROUND_TRIP_DOCS = [
    {
        "target": {"subject": "database.cleanup"},
        "payload": {"type": "json", "data": '{"table":"user_sessions"}'},
        "schedule": {"cron": "0 2 * * *"},
    },
    {"subject": "my.app.task", "schedule": {"every": "30s"}},
    {"subject": "my.app.task", "schedule": {"every": "1.5h"}},
    doc({"cron": "CRON_TZ=Europe/Berlin 30 2 * * 1-5", "jitter": "1.5s", "grace": "10m"}),
    doc({"cron": "TZ=America/New_York @daily", "paused": True}),
    doc({"cron": "0 0 12 * * MON", "timezone": "Asia/Tokyo"}),
    {
        "target": {"subject": "bin.blob"},
        "payload": {"type": "base64", "data": "AAEC/w=="},
        "schedule": {"at": "2030-01-02T03:04:05.123+02:00"},
    },
    {
        "target": {"subject": "a.b"},
        "payload": {"type": "text", "data": "héllo"},
        "schedule": {
            "every": "1h30m",
            "start": "2026-01-01T00:00:00Z",
            "end": "2027-01-01T00:00:00-05:00",
            "jitter": "250ms",
            "grace": "0s",
            "timezone": "Europe/Berlin",
        },
        "paused": True,
    },
    {"target": {"subject": "a.b"}, "payload": {"data": "verbatim"}, "schedule": {"every": "2m"}},
    {"target": {"subject": "a.b"}, "payload": {"data": ""}, "schedule": {"every": "2m"}},
    doc({"every": "1m"}, delivery={"mode": "request"}),
    doc({"every": "1m"}, delivery={"mode": "jetstream", "timeout": "1500ms"}),
    doc(
        {"every": "1m"},
        delivery={
            "mode": "request",
            "timeout": "5s",
            "retry": {"attempts": 3, "backoff": "1s", "max_backoff": "1m", "multiplier": 1.5},
            "overlap": "skip",
        },
    ),
]


@pytest.mark.parametrize("document", ROUND_TRIP_DOCS)
def test_to_document_round_trip(document: dict[str, Any]) -> None:
    spec = parse(document)
    out = spec.to_document()
    json.dumps(out)  # plain JSON
    assert out["target"] == {"subject": spec.subject}
    assert parse(out) == spec
    assert parse(json.loads(json.dumps(out))) == spec
    assert parse(copy.deepcopy(out)).to_document() == out


# --- EveryTrigger ------------------------------------------------------------------------------

ANCHOR = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)


def test_every_trigger_before_anchor_returns_anchor() -> None:
    trigger = EveryTrigger(timedelta(minutes=5), ANCHOR)
    assert trigger.get_next_fire_time(None, ANCHOR - timedelta(days=3)) == ANCHOR


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (timedelta(seconds=1), timedelta(seconds=90)),
        (timedelta(seconds=89), timedelta(seconds=90)),
        (timedelta(seconds=90), timedelta(seconds=180)),
        (timedelta(seconds=91), timedelta(seconds=180)),
        (timedelta(days=1, seconds=1), timedelta(days=1, seconds=90)),  # 86400 = 960 * 90
        (timedelta(days=365, hours=5, seconds=7), timedelta(days=365, hours=5, seconds=90)),
    ],
)
def test_every_trigger_keeps_phase_for_any_now(offset: timedelta, expected: timedelta) -> None:
    trigger = EveryTrigger(timedelta(seconds=90), ANCHOR)
    assert trigger.get_next_fire_time(None, ANCHOR + offset) == ANCHOR + expected


def test_every_trigger_anchor_in_other_zone() -> None:
    anchor = datetime(2026, 1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    trigger = EveryTrigger(timedelta(minutes=1), anchor)
    now = datetime(2026, 6, 1, 12, 0, 45, tzinfo=UTC)
    assert trigger.get_next_fire_time(None, now) == datetime(2026, 6, 1, 12, 1, 30, tzinfo=UTC)


def test_every_trigger_previous_gives_next_slot_even_when_late() -> None:
    interval = timedelta(minutes=10)
    trigger = EveryTrigger(interval, ANCHOR)
    previous = ANCHOR + 5 * interval
    for lateness in (timedelta(0), timedelta(seconds=1), timedelta(minutes=37), timedelta(hours=5)):
        assert trigger.get_next_fire_time(previous, previous + lateness) == previous + interval
    # A previous fire recorded off the grid (fired late) still comes back onto it.
    for late_by in (
        timedelta(microseconds=1),
        timedelta(seconds=3),
        timedelta(minutes=9, seconds=59),
    ):
        assert trigger.get_next_fire_time(previous + late_by, previous + late_by) == (
            previous + interval
        )


def test_every_trigger_end_date() -> None:
    interval = timedelta(hours=1)
    trigger = EveryTrigger(interval, ANCHOR, end_date=ANCHOR + timedelta(hours=2))
    assert trigger.get_next_fire_time(None, ANCHOR + timedelta(minutes=30)) == ANCHOR + interval
    # The end is inclusive, as in APScheduler's own triggers.
    assert trigger.get_next_fire_time(ANCHOR + interval, ANCHOR + interval) == ANCHOR + 2 * interval
    assert trigger.get_next_fire_time(ANCHOR + 2 * interval, ANCHOR + 2 * interval) is None
    assert trigger.get_next_fire_time(None, ANCHOR + timedelta(days=9)) is None
    early = EveryTrigger(interval, ANCHOR, end_date=ANCHOR - timedelta(seconds=1))
    assert early.get_next_fire_time(None, ANCHOR - timedelta(hours=1)) is None


@pytest.mark.parametrize("interval", [timedelta(0), timedelta(seconds=-1)])
def test_every_trigger_rejects_non_positive_interval(interval: timedelta) -> None:
    with pytest.raises(ValueError):
        EveryTrigger(interval, ANCHOR)


def test_every_trigger_pickles() -> None:
    trigger = EveryTrigger(timedelta(seconds=7), ANCHOR, end_date=ANCHOR + timedelta(days=1))
    clone = pickle.loads(pickle.dumps(trigger))
    now = ANCHOR + timedelta(hours=3, seconds=2)
    assert clone.get_next_fire_time(None, now) == trigger.get_next_fire_time(None, now)
    assert clone.interval == trigger.interval and clone.anchor == trigger.anchor


@settings(max_examples=300, deadline=None)
@given(
    anchor=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    interval=st.timedeltas(min_value=timedelta(milliseconds=1), max_value=timedelta(days=10)),
    offset=st.integers(min_value=-(10**12), max_value=10**13),
    previous_slots=st.integers(min_value=0, max_value=10**5),
    lateness=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=30)),
)
def test_every_trigger_phase_property(
    anchor: datetime, interval: timedelta, offset: int, previous_slots: int, lateness: timedelta
) -> None:
    trigger = EveryTrigger(interval, anchor)
    now = anchor + timedelta(microseconds=offset)
    result = trigger.get_next_fire_time(None, now)
    assert result is not None
    if now < anchor:
        assert result == anchor
    else:
        assert result > now
        assert (result - anchor) % interval == timedelta(0)
        assert result - interval <= now
    previous = anchor + previous_slots * interval
    assert trigger.get_next_fire_time(previous, previous + lateness) == previous + interval


# --- fuzz: parse_job returns a JobSpec or raises SpecError --------------------------------------

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=30)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(ANY_TEXT, children, max_size=4)
    ),
    max_leaves=12,
)

subjects = st.one_of(
    st.sampled_from(VALID_SUBJECTS + [s for s, _ in INVALID_SUBJECTS]),
    ANY_TEXT,
    st.from_regex(r"[-/_=a-zA-Z0-9.*>$ ]{0,20}", fullmatch=True),
    st.lists(
        st.sampled_from(["a", "b1", "nats-cron", "$JS", "*", ">", "", "é", "x y"]),
        min_size=1,
        max_size=4,
    ).map(".".join),
)

durations = st.one_of(
    st.from_regex(
        r"[+-]?([0-9]{0,4}(\.[0-9]{0,3})?(ns|us|µs|μs|ms|s|m|h|d|w|S|H|)){1,3}", fullmatch=True
    ),
    ANY_TEXT,
    st.sampled_from(
        [
            "1s",
            "30s",
            "1h30m",
            "1.5h",
            "0",
            "-1s",
            "1d",
            " 1s",
            "300ms",
            "9223372036854775807ns",
            "9223372036854775808ns",
            "2562047h",
            "2562048h",
            "99999999999999999999h",
            ".",
            "+",
            "-",
            "1.",
            ".5s",
        ]
    ),
)

cron_tokens = st.one_of(
    st.sampled_from(
        [
            "*",
            "?",
            "0",
            "7",
            "59",
            "60",
            "*/0",
            "*/2",
            "1-5",
            "5-1",
            "5-7",
            "MON",
            "jan",
            "dec-jan",
            "L",
            "1,2",
            "",
            ",",
            "1,,2",
            "a/b",
            "٣",
            "*/x",
            "2/",
            "/2",
            "-",
            "0-",
            "-0",
            "sun-sat",
            "1-31/7",
            "31",
            "32",
            "13",
            "24",
            "@",
        ]
    ),
    st.text(st.characters(exclude_categories=()), max_size=4),
)
crons = st.one_of(
    ANY_TEXT,
    st.tuples(
        st.sampled_from(
            [
                "",
                "TZ=Europe/Berlin ",
                "CRON_TZ=UTC ",
                "CRON_TZ=",
                "TZ=Europe/Berlin",
                "TZ=Mars/X ",
                "TZ=../x ",
                "TZ=\x00 ",
                "CRON_TZ=America/New_York  ",
            ]
        ),
        st.lists(cron_tokens, min_size=0, max_size=7).map(" ".join),
    ).map("".join),
    st.sampled_from(
        [
            "@yearly",
            "@annually",
            "@monthly",
            "@weekly",
            "@daily",
            "@midnight",
            "@hourly",
            "@every 1h",
            "@reboot",
            "@",
            "@DAILY",
            "0 0 30 2 *",
            "0 0 30 2 1",
            "CRON_TZ=Europe/Berlin @daily",
        ]
    ),
)

zones = st.one_of(
    st.sampled_from(
        [
            "UTC",
            "Europe/Berlin",
            "America/New_York",
            "Etc/GMT+5",
            "",
            "Mars/Olympus",
            "../etc",
            "/etc/localtime",
            "Europe/Berlin\x00",
            "é",
            "Europe",
            "zoneinfo",
            ".",
            "..",
            "Europe/Berlin/",
        ]
    ),
    ANY_TEXT,
)

instants = st.one_of(
    ANY_TEXT,
    st.datetimes(timezones=st.none() | st.just(UTC) | st.timezones()).map(lambda d: d.isoformat()),
    st.from_regex(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?)?"
        r"(Z|z|[+-][0-9]{2}:?[0-9]{2})?",
        fullmatch=True,
    ),
    st.sampled_from(
        [
            "2030-01-02T03:04:05Z",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
            "2030-01-02T03:04:05",
        ]
    ),
)

payloads = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(
            st.sampled_from(["json", "text", "base64", "xml", ""]), st.none(), ANY_TEXT, json_values
        ),
        "data": st.one_of(
            ANY_TEXT,
            json_values,
            st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
            st.sampled_from(['{"a":1}', "{", "aGVsbG8=", "", "NaN", "[1,2"]),
        ),
        "extra": json_values,
    },
)

schedules = st.fixed_dictionaries(
    {},
    optional={
        "every": st.one_of(durations, json_values),
        "cron": st.one_of(crons, json_values),
        "at": st.one_of(instants, json_values),
        "timezone": st.one_of(zones, json_values),
        "jitter": durations,
        "grace": durations,
        "start": instants,
        "end": instants,
        "paused": st.one_of(st.booleans(), json_values),
        "bogus": json_values,
    },
)


@st.composite
def documents(draw: st.DrawFn) -> Any:
    subject = draw(st.one_of(subjects, json_values))
    schedule = draw(st.one_of(schedules, json_values))
    form = draw(st.sampled_from(["readme", "flat", "both"]))
    out: dict[Any, Any]
    if form == "readme":
        out = {
            "target": draw(st.one_of(st.just({"subject": subject}), json_values)),
            "schedule": schedule,
        }
    elif form == "flat":
        out = {"subject": subject, "schedule": schedule}
    else:
        out = {"subject": subject, "target": {"subject": subject}, "schedule": schedule}
    if draw(st.booleans()):
        out["payload"] = draw(st.one_of(payloads, json_values))
    extra = draw(
        st.dictionaries(
            st.sampled_from(
                ["next_run", "last_run", "run_count", "last_error", "paused", "foo", ""]
            ),
            json_values,
            max_size=3,
        )
    )
    out.update(extra)
    return out


def _check(document: Any, min_interval: timedelta, max_payload: int | None) -> JobSpec | None:
    try:
        spec = parse_job(document, min_interval=min_interval, max_payload=max_payload, now=NOW)
    except SpecError as exc:
        assert str(exc).strip()
        return None
    assert isinstance(spec, JobSpec)
    return spec


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(document=json_values)
def test_fuzz_any_json_value(document: Any) -> None:
    _check(document, timedelta(seconds=1), None)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    document=documents(),
    min_interval=st.sampled_from(
        [timedelta(0), timedelta(microseconds=1), timedelta(seconds=1), timedelta(minutes=5)]
    ),
    max_payload=st.none() | st.integers(min_value=0, max_value=64),
)
def test_fuzz_near_valid_documents(
    document: Any, min_interval: timedelta, max_payload: int | None
) -> None:
    spec = _check(document, min_interval, max_payload)
    if spec is not None:
        # Whatever parses, round-trips, and its body respects max_payload.
        again = parse_job(
            spec.to_document(), min_interval=min_interval, max_payload=max_payload, now=NOW
        )
        assert again == spec
        if max_payload is not None and spec.payload_bytes:
            assert len(spec.payload_bytes) <= max_payload


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    subject=st.sampled_from(["a.b", "orders.eu"]),
    kind=st.sampled_from(["every", "cron", "at"]),
    value=st.one_of(durations, crons, instants),
    timezone_name=st.none() | zones,
)
def test_fuzz_single_field(subject: str, kind: str, value: str, timezone_name: str | None) -> None:
    schedule: dict[str, Any] = {kind: value}
    if timezone_name is not None:
        schedule["timezone"] = timezone_name
    _check({"target": {"subject": subject}, "schedule": schedule}, timedelta(0), None)


# --- `@every` and zones on intervals (issue 13) ---------------------------------------------


@pytest.mark.parametrize(
    ("cron", "every"),
    [("@every 5m", "5m"), ("@EVERY 90s", "90s"), ("  @every 1h30m ", "1h30m")],
)
def test_every_descriptor_is_an_interval(cron: str, every: str) -> None:
    spec = parse(doc({"cron": cron}), strict=True)
    assert spec.kind == "every" and spec.cron is None
    assert spec.to_document()["schedule"] == {"every": every}
    assert parse(doc({"every": every})) == spec


@pytest.mark.parametrize("cron", ["@every", "@every 1m 2m"])
def test_every_descriptor_needs_one_duration(cron: str) -> None:
    error = spec_error(doc({"cron": cron}))
    assert error.field == "schedule.cron" and "@every 5m" in error.rule


def test_every_descriptor_obeys_the_interval_rules() -> None:
    assert 'unknown unit "d"' in spec_error(doc({"cron": "@every 1d"})).rule
    assert "positive" in spec_error(doc({"cron": "@every 0s"})).rule
    low = spec_error(doc({"cron": "@every 10ms"}), min_interval=timedelta(seconds=1))
    assert low.field == "schedule.cron" and "minimum interval" in low.rule


@pytest.mark.parametrize(
    "schedule",
    [
        {"every": "30s", "timezone": "Europe/Berlin"},
        {"every": "30s", "timezone": "UTC"},
        {"cron": "@every 30s", "timezone": "Europe/Berlin"},
    ],
)
def test_a_zone_on_an_interval_is_refused_when_strict(schedule: dict[str, Any]) -> None:
    error = spec_error(doc(schedule), strict=True)
    assert error.field == "schedule.timezone" and "no effect" in error.rule
    # A record stored before the rule still loads (and so keeps firing).
    assert parse(doc(schedule)).every == timedelta(seconds=30)


def test_a_zone_prefix_on_every_descriptor_is_refused_when_strict() -> None:
    error = spec_error(doc({"cron": "CRON_TZ=Europe/Berlin @every 5m"}), strict=True)
    assert error.field == "schedule.cron" and "no effect" in error.rule
    assert parse(doc({"cron": "CRON_TZ=Europe/Berlin @every 5m"})).kind == "every"


def test_strict_keeps_zones_where_they_matter() -> None:
    assert parse(doc({"cron": "0 9 * * *", "timezone": "Europe/Berlin"}), strict=True)
    assert parse(doc({"cron": "TZ=Asia/Tokyo 0 9 * * *"}), strict=True).timezone == "Asia/Tokyo"


def test_revision_is_read_only_input() -> None:
    """A document read back with `get` carries its revision; parsing ignores it."""
    spec = parse({**doc({"every": "1m"}), "revision": 12, "run_count": 3})
    assert spec.to_document()["schedule"] == {"every": "1m"}


# --- delivery (SPEC §10) ---------------------------------------------------------------------


def test_delivery_defaults_to_a_plain_publish() -> None:
    for delivery in (None, {}, {"mode": "publish"}):
        document = doc({"every": "1m"}) if delivery is None else doc(delivery=delivery)
        spec = parse(document)
        assert spec.delivery == DeliverySpec() and not spec.delivery.tracked
        assert "delivery" not in spec.to_document()  # documents stored before keep their form


def test_delivery_modes_and_their_defaults() -> None:
    request = parse(doc(delivery={"mode": "request"})).delivery
    assert (request.mode, request.timeout, request.retry, request.overlap) == (
        "request",
        timedelta(seconds=30),
        None,
        "allow",
    )
    jetstream = parse(doc(delivery={"mode": "jetstream"})).delivery
    assert jetstream.timeout == timedelta(seconds=5) and jetstream.tracked
    full = parse(
        doc(
            delivery={
                "mode": "request",
                "timeout": "5s",
                "retry": {"attempts": 4, "backoff": "1s", "max_backoff": "3s", "multiplier": 2},
                "overlap": "skip",
            }
        )
    ).delivery
    assert full.overlap == "skip" and full.retry == RetrySpec(
        4, timedelta(seconds=1), timedelta(seconds=3), 2.0
    )
    assert full.to_document() == {
        "mode": "request",
        "timeout": "5s",
        "retry": {"attempts": 4, "backoff": "1s", "max_backoff": "3s", "multiplier": 2},
        "overlap": "skip",
    }
    # Retry defaults: backoff 1s, max_backoff 1m (or the backoff, if longer), multiplier 2.
    assert parse(doc(delivery={"mode": "jetstream", "retry": {"attempts": 2}})).delivery.retry == (
        RetrySpec(2, timedelta(seconds=1), timedelta(minutes=1), 2.0)
    )
    long = {"mode": "request", "retry": {"attempts": 2, "backoff": "5m"}}
    assert parse(doc(delivery=long)).delivery.retry.max_backoff == timedelta(minutes=5)  # type: ignore[union-attr]


def test_retry_backoff_grows_and_is_capped() -> None:
    retry = RetrySpec(10, timedelta(seconds=1), timedelta(seconds=10), 3.0)
    assert [retry.delay(n).total_seconds() for n in range(1, 6)] == [1, 3, 9, 10, 10]
    flat = RetrySpec(3, timedelta(milliseconds=500), timedelta(minutes=1), 1.0)
    assert {flat.delay(n) for n in range(1, 50)} == {timedelta(milliseconds=500)}
    huge = RetrySpec(100, timedelta(seconds=1), timedelta(hours=24), 100.0)
    assert huge.delay(100) == timedelta(hours=24)  # no float overflow


@pytest.mark.parametrize(
    ("delivery", "field", "words"),
    [
        ({"mode": "carrier-pigeon"}, "delivery.mode", "not one of publish, jetstream, request"),
        ({"mode": 3}, "delivery.mode", "string"),
        ("request", "delivery", "JSON object"),
        ({"mode": "request", "timeout": "0s"}, "delivery.timeout", "positive"),
        ({"mode": "request", "timeout": "-5s"}, "delivery.timeout", "positive"),
        ({"mode": "request", "timeout": "2h"}, "delivery.timeout", "maximum"),
        ({"mode": "request", "timeout": "5 s"}, "delivery.timeout", "not a duration"),
        ({"mode": "request", "timeout": "1d"}, "delivery.timeout", "unknown unit"),
        ({"timeout": "5s"}, "delivery.timeout", "needs mode request or jetstream"),
        ({"retry": {"attempts": 3}}, "delivery.retry", "needs mode request or jetstream"),
        ({"mode": "request", "retry": {}}, "delivery.retry.attempts", "required"),
        ({"mode": "request", "retry": {"attempts": 0}}, "delivery.retry.attempts", "from 1"),
        ({"mode": "request", "retry": {"attempts": -1}}, "delivery.retry.attempts", "from 1"),
        ({"mode": "request", "retry": {"attempts": 101}}, "delivery.retry.attempts", "to 100"),
        ({"mode": "request", "retry": {"attempts": True}}, "delivery.retry.attempts", "integer"),
        ({"mode": "request", "retry": {"attempts": 2.5}}, "delivery.retry.attempts", "integer"),
        (
            {"mode": "request", "retry": {"attempts": 2, "multiplier": 0.5}},
            "delivery.retry.multiplier",
            "from 1",
        ),
        (
            {"mode": "request", "retry": {"attempts": 2, "multiplier": "2"}},
            "delivery.retry.multiplier",
            "must be a number, not string",
        ),
        (
            {"mode": "request", "retry": {"attempts": 2, "backoff": "0s"}},
            "delivery.retry.backoff",
            "positive",
        ),
        (
            {"mode": "request", "retry": {"attempts": 2, "backoff": "5s", "max_backoff": "1s"}},
            "delivery.retry.max_backoff",
            "shorter than delivery.retry.backoff",
        ),
        (
            {"mode": "request", "retry": {"attempts": 2, "tries": 3}},
            "delivery.retry.tries",
            "unknown",
        ),
        ({"overlap": "skip"}, "delivery.overlap", "needs mode request"),
        ({"mode": "jetstream", "overlap": "skip"}, "delivery.overlap", "needs mode request"),
        ({"mode": "request", "overlap": "sometimes"}, "delivery.overlap", "allow, skip"),
        ({"mode": "request", "retries": 3}, "delivery.retries", "unknown field"),
    ],
)
def test_bad_delivery_names_field_and_rule(delivery: Any, field: str, words: str) -> None:
    error = spec_error(doc(delivery=delivery))
    assert error.field == field, str(error)
    assert words in error.rule, str(error)


def test_delivery_of_a_stored_document() -> None:
    assert delivery_of(None) == DeliverySpec()
    stored = parse(doc(delivery={"mode": "request", "overlap": "skip"})).to_document()
    assert delivery_of(stored["delivery"]).overlap == "skip"
    with pytest.raises(SpecError, match=r"delivery\.mode"):
        delivery_of({"mode": "fax"})
