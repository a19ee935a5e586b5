"""Hypothesis fuzzer against every API endpoint of three real `nats-cron serve` processes.

Malformed JSON, wrong types, missing and extra fields, payloads over the server's
max_payload, unicode and wildcard subjects, bad cron, durations and zones, `TZ=` without a
space, pattern deletes. After every request: a reply came, it is not 5xx, an error names
what is wrong. At the end: every instance still runs, every stored job is a valid document
and the seeded jobs are unchanged.

CI runs `NATS_CRON_FUZZ_EXAMPLES` requests (default 1,500); the long run is
`NATS_CRON_FUZZ_EXAMPLES=10000 python -m pytest tests/test_fuzz.py -s`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nats_apscheduler._bridge import LoopBridge
from nats_apscheduler.client import CronClient
from nats_apscheduler.embedded import EmbeddedNatsServer
from nats_apscheduler.jobs import subject_matches
from nats_apscheduler.spec import parse_job
from tests.helpers.cluster import ServeProcess

EXAMPLES = int(os.environ.get("NATS_CRON_FUZZ_EXAMPLES", "1500"))
MAX_PAYLOAD = 65536
ENDPOINTS = [
    "nats-cron.jobs.list",
    "nats-cron.jobs.get",
    "nats-cron.jobs.create",
    "nats-cron.jobs.update",
    "nats-cron.jobs.delete",
    "nats-cron.jobs.delete.pattern",
    "nats-cron.jobs.pause",
    "nats-cron.jobs.resume",
    "nats-cron.jobs.trigger",
    "nats-cron.jobs.history",
    "nats-cron.status",
]
SEEDED = {
    "seed.cron": {
        "target": {"subject": "seed.cron"},
        "payload": {"type": "json", "data": '{"k": 1}'},
        "schedule": {"cron": "0 3 * * *", "timezone": "Europe/Berlin"},
    },
    "seed.every": {"target": {"subject": "seed.every"}, "schedule": {"every": "1h"}},
}


class Harness:
    def __init__(self, tmp: Path) -> None:
        config = tmp / "nats.conf"
        config.write_text(f"max_payload: {MAX_PAYLOAD}\n")
        self.server = EmbeddedNatsServer(tmp / "js", config_file=config).start()
        env = {"NATS_URL": self.server.url, "NATS_CRON_MIN_INTERVAL": "1s"}
        self.procs = [ServeProcess(f"fz{i}", env) for i in range(3)]
        for proc in self.procs:
            proc.wait_for("nats-cron instance started", timeout=20)
        self.bridge = LoopBridge.on_new_thread("fuzz-client")
        self.nc = self.bridge.call(nats.connect(self.server.url), 10)
        self.api = CronClient(self.nc, timeout=10)
        self.requests = 0

    def request(self, subject: str, data: bytes) -> Any:
        self.requests += 1
        return self.bridge.call(self.nc.request(subject, data, timeout=10), 15)

    def close(self) -> None:
        self.bridge.call(self.nc.close(), 10)
        self.bridge.stop()
        for proc in self.procs:
            proc.stop()
        self.server.stop()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("fuzz"))
    for doc in SEEDED.values():
        h.bridge.call(h.api.create(doc), 15)
    yield h
    h.close()


# --- strategies ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
tokens = st.sampled_from(["fz", "a", "*", ">", "", "é", "x y", "$JS", "nats-cron", "ok-1", "a/b=c"])
subjects = st.one_of(
    st.lists(tokens, min_size=1, max_size=4).map(".".join),
    st.text(max_size=40),
    st.sampled_from(["fz.ok", "fz.ok2", "$JS.API.STREAM.LIST", "nats-cron.jobs.list", "fz.*"]),
)
durations = st.one_of(
    st.sampled_from(
        ["1s", "30s", "1h30m", "1.5h", "0s", "-5s", "1d", "300ms", "1ns", "", "5", "h"]
    ),
    st.text(max_size=12),
)
crons = st.one_of(
    st.sampled_from(
        [
            "0 9 * * MON",
            "*/5 * * * *",
            "@daily",
            "@every 5s",
            "0 0 30 2 *",
            "61 * * * *",
            "TZ=Europe/Berlin",
            "TZ=Europe/Berlin0 9 * * *",
            "CRON_TZ=Mars/Base 0 9 * * *",
            "CRON_TZ=Europe/Berlin 0 9 * * *",
            "0 12 13 * 5",
            "* * * * * * *",
            "? ? ? ? ?",
        ]
    ),
    st.text(max_size=30),
)
zones = st.one_of(
    st.sampled_from(["UTC", "Europe/Berlin", "../etc/passwd", "", "Nope/Zone"]),
    st.text(max_size=20),
)
schedules = st.one_of(
    st.fixed_dictionaries({"every": durations}),
    st.fixed_dictionaries({"cron": crons}, optional={"timezone": zones}),
    st.fixed_dictionaries({"at": st.text(max_size=30) | st.just("2030-01-01T00:00:00Z")}),
    st.dictionaries(
        st.sampled_from(
            ["every", "cron", "at", "jitter", "grace", "start", "end", "paused", "zzz"]
        ),
        json_values,
        max_size=4,
    ),
)
payloads = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["json", "text", "base64", "xml"]) | json_values,
            "data": json_values,
        }
    ),
    st.fixed_dictionaries({"type": st.just("text"), "data": st.just("x" * (MAX_PAYLOAD - 400))}),
)
documents = st.one_of(
    st.fixed_dictionaries(
        {"target": st.fixed_dictionaries({"subject": subjects}), "schedule": schedules},
        optional={"payload": payloads, "paused": json_values, "extra": json_values},
    ),
    st.fixed_dictionaries({"subject": subjects, "schedule": schedules}),
    json_values,
)
bodies = st.one_of(
    documents.map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"subject": subjects}).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"pattern": subjects}).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"subject": subjects, "limit": json_values}).map(
        lambda d: json.dumps(d).encode()
    ),
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"null", b"[]", b'{"subject": null}', b"\xff\xfe"]),
)


def _touches_seed(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    target = data.get("target")
    candidates = [
        data.get("subject"),
        data.get("pattern"),
        target.get("subject") if isinstance(target, dict) else None,
    ]
    return any(
        isinstance(c, str) and any(subject_matches(c, seed) or c == seed for seed in SEEDED)
        for c in candidates
    )


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
@given(endpoint=st.sampled_from(ENDPOINTS), body=bodies)
def test_no_request_crashes_or_corrupts(harness: Harness, endpoint: str, body: bytes) -> None:
    if _touches_seed(body):
        return  # the seeded jobs are the control group
    try:
        msg = harness.request(endpoint, body)
    except nats.errors.MaxPayloadError:
        return  # larger than the server accepts: the client refuses to send it at all
    headers = msg.headers or {}
    code = headers.get("Nats-Service-Error-Code")
    if code is None:
        json.loads(msg.data)  # a success reply is JSON
        return
    assert code in ("400", "404", "409"), (endpoint, body[:200], code, msg.data[:300])
    error = json.loads(msg.data)["error"]
    assert isinstance(error, str) and len(error) > 5 and "internal error" not in error
    if code == "400":
        assert ":" in error or "required" in error, error  # names the field and the rule


def test_after_fuzzing_everything_is_intact(harness: Harness) -> None:
    """Runs after the fuzzer (same module, file order)."""
    assert all(proc.proc.poll() is None for proc in harness.procs), "an instance exited"
    status = harness.bridge.call(harness.api.status(), 15)
    assert status["leader"] is not None
    jobs = harness.bridge.call(harness.api.list(), 15)
    read_only = ("next_run", "last_run", "last_scheduled", "run_count", "last_error")
    for job in jobs:
        parse_job({k: v for k, v in job.items() if k not in read_only}, min_interval=timedelta(0))
    by_subject = {job["target"]["subject"]: job for job in jobs}
    for subject, doc in SEEDED.items():
        stored = by_subject[subject]
        assert stored["schedule"]["cron" if "cron" in doc["schedule"] else "every"] == (
            doc["schedule"].get("cron") or doc["schedule"].get("every")
        )
        assert stored.get("payload") == doc.get("payload")
    print(f"\nfuzzer: {harness.requests} requests, {len(jobs)} jobs stored, 0 crashes, 0 5xx")
