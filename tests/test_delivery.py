"""Delivery modes, outcomes, retries, events and dead letters (SPEC §10), against a real
nats-server with real workers: the `nats micro` worker of deploy/examples in another
process, JetStream streams, and (for failover) real `nats-cron serve` processes.

Every wait is for an event (a run's event, a dead letter, a log line, a KV key) inside a
timeout; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StreamConfig
from prometheus_client.parser import text_string_to_metric_families

from nats_apscheduler._wire import Wire
from nats_apscheduler.client import ApiError, CronClient
from nats_apscheduler.delivery import Deliveries, classify
from nats_apscheduler.fire import Fire, Firer, Plans
from nats_apscheduler.history import History, RunStates
from nats_apscheduler.server import NatsCron
from nats_apscheduler.settings import Connection, Settings
from tests.helpers.cli_run import Cli, cli_env
from tests.helpers.cluster import ServeProcess
from tests.helpers.waiting import eventually
from tests.test_fire import make_job

EXAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "examples"


# --- helpers ------------------------------------------------------------------------------------


class Events:
    """Every event published under a prefix (what the leader records), in arrival order."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def subscribe(self, nc: Client, prefix: str, pattern: str = ">") -> None:
        await nc.subscribe(f"{prefix}.{pattern}", cb=self._on_msg)
        await nc.flush()

    async def _on_msg(self, msg: Msg) -> None:
        async with self._changed:
            self.items.append(json.loads(msg.data))
            self._changed.notify_all()

    def of(self, subject: str, outcome: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.items
            if e["subject"] == subject and (outcome is None or e["outcome"] == outcome)
        ]

    async def wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(check)

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            summary = [(e["subject"], e.get("attempt"), e["outcome"]) for e in self.items[-12:]]
            raise AssertionError(f"no {what} within {timeout}s; last events: {summary}") from None


class Worker:
    """deploy/examples/micro_worker.py in a child process; its JSON lines are collected."""

    def __init__(self, url: str, subject: str) -> None:
        self.lines: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        env = {**os.environ, "NATS_URL": url, "WORKER_SUBJECT": subject}
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "micro_worker.py")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                with contextlib.suppress(ValueError):
                    self.lines.append(json.loads(line))
                self._cond.notify_all()

    def wait_for(self, check: Callable[[list[dict[str, Any]]], bool], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not check(self.lines):
                remaining = deadline - time.monotonic()
                assert remaining > 0 and self.proc.poll() is None, f"worker: {self.lines[-5:]}"
                self._cond.wait(min(remaining, 0.2))

    async def ready(self) -> None:
        await asyncio.to_thread(
            self.wait_for, lambda lines: any(ln.get("msg") == "listening" for ln in lines)
        )

    def requests(self, subject: str) -> list[dict[str, Any]]:
        with self._cond:
            return [ln for ln in self.lines if ln.get("subject") == subject]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def job(
    subject: str,
    every: str = "1h",
    payload: dict[str, Any] | None = None,
    **delivery: Any,
) -> dict[str, Any]:
    document: dict[str, Any] = {"target": {"subject": subject}, "schedule": {"every": every}}
    if payload is not None:
        document["payload"] = {"type": "json", "data": payload}
    if delivery:
        document["delivery"] = delivery
    return document


def settings_for(url: str, bucket: str, **extra: Any) -> Settings:
    return Settings(
        connection=Connection(url=url),
        instance_id=f"{bucket}-cron",
        jobs_bucket=f"{bucket}-jobs",
        leader_bucket=f"{bucket}-leader",
        events_stream=f"E_{bucket}".replace("-", "_"),
        events_prefix=f"ev.{bucket}",
        **extra,
    )


async def leading(cron: NatsCron) -> None:
    async def check() -> bool:
        return cron.term is not None

    await eventually(check, 10, "the instance leads")


async def retry_record(nc: Client, bucket: str, subject: str) -> dict[str, Any] | None:
    """The retry record of a job in the leader bucket (None: no record, or deleted)."""
    kv = await nc.jetstream().key_value(f"{bucket}-leader")
    try:
        entry = await kv.get(f"retry.{subject}")
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    return json.loads(entry.value) if entry.value else None


def metric(text: bytes, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@pytest.fixture
async def cron(nats_url: str, bucket: str) -> AsyncIterator[NatsCron]:
    instance = NatsCron(settings_for(nats_url, bucket))
    await instance.start()
    await leading(instance)
    yield instance
    await instance.stop()


@pytest.fixture
async def worker(nats_url: str, bucket: str) -> AsyncIterator[Worker]:
    child = Worker(nats_url, f"{bucket}.work.>")
    await child.ready()
    yield child
    child.stop()


@pytest.fixture
async def events(nc: Client, bucket: str) -> Events:
    found = Events()
    await found.subscribe(nc, f"ev.{bucket}")
    return found


@pytest.fixture
def api(nc: Client) -> CronClient:
    return CronClient(nc, timeout=5)


# --- the outcomes -------------------------------------------------------------------------------


async def test_each_request_outcome(
    cron: NatsCron, worker: Worker, events: Events, api: CronClient, bucket: str
) -> None:
    ok, fail = f"{bucket}.work.ok", f"{bucket}.work.fail"
    slow, nobody = f"{bucket}.work.slow", f"{bucket}.nobody.home"
    await api.create(job(ok, payload={}, mode="request", timeout="5s"))
    await api.create(job(fail, payload={"fail": "on purpose"}, mode="request"))
    await api.create(job(slow, payload={"sleep": 3}, mode="request", timeout="500ms"))
    await api.create(job(nobody, mode="request"))
    for subject in (ok, fail, slow, nobody):
        await api.trigger(subject)
    await events.wait(lambda: all(events.of(s) for s in (ok, fail, slow, nobody)), 10, "events")

    (good,) = events.of(ok)
    assert good["outcome"] == "succeeded" and good["attempt"] == 1 and good["mode"] == "request"
    assert 0 <= good["duration"] < 2
    reply = json.loads(good["reply"])  # the first 1 KiB of the worker's reply
    assert reply["ok"] is True and reply["attempt"] == 1
    slot_ms = round(datetime.fromisoformat(good["scheduled"]).timestamp() * 1000)
    assert good["run_id"] == reply["run_id"] == f"{ok}:{slot_ms}:1"
    assert good["error"] is None and good["last_success"] == good["actual"]

    (bad,) = events.of(fail)
    assert bad["outcome"] == "failed" and bad["error"] == "500 on purpose"
    assert bad["consecutive_failures"] == 1 and bad["last_success"] is None

    (late,) = events.of(slow)
    assert late["outcome"] == "timeout" and late["error"] == "no reply within 500ms"
    assert 0.45 <= late["duration"] < 1.5

    (nobody_event,) = events.of(nobody)
    assert nobody_event["outcome"] == "no_responders"
    assert nobody_event["duration"] < 0.5  # the server says so at once

    # The worker saw the fire's headers (its log line per request).
    (seen,) = worker.requests(ok)
    assert seen["attempt"] == 1 and seen["run_id"] == good["run_id"]

    # get: last outcome, last success, consecutive failures; history: the events.
    got = await api.get(ok)
    assert (got["last_outcome"], got["last_success"], got["consecutive_failures"]) == (
        "succeeded",
        good["actual"],
        0,
    )
    assert got["delivery"] == {"mode": "request", "timeout": "5s", "overlap": "allow"}
    failing = await api.get(fail)
    assert failing["last_outcome"] == "failed" and failing["last_error"] == "500 on purpose"
    assert failing["consecutive_failures"] == 1 and failing["last_success"] is None
    runs = (await api.history(slow))["runs"]
    assert [r["outcome"] for r in runs] == ["timeout"]

    # Metrics: counted by outcome, and the last success per job.
    text = cron.metrics.exposition()
    for subject, outcome in (
        (ok, "succeeded"),
        (fail, "failed"),
        (slow, "timeout"),
        (nobody, "no_responders"),
    ):
        assert metric(text, "nats_cron_fires_total", subject=subject, outcome=outcome) == 1
    success = metric(text, "nats_cron_last_success_timestamp_seconds", subject=ok)
    assert success == pytest.approx(datetime.fromisoformat(good["actual"]).timestamp(), abs=2)
    assert metric(text, "nats_cron_last_success_timestamp_seconds", subject=fail) == 0
    assert metric(text, "nats_cron_runs_in_flight") == 0


async def test_jetstream_outcomes_with_a_consumer_worker(
    cron: NatsCron, events: Events, api: CronClient, nc: Client, bucket: str, nats_url: str
) -> None:
    """deploy/examples/jetstream_worker.py creates the stream and consumes what is stored."""
    stream = f"W_{bucket}".replace("-", "_")
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "WORKER_SUBJECT": f"{bucket}.stored.>",
        "WORKER_STREAM": stream,
        "WORKER_DURABLE": "w",
    }
    child = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "jetstream_worker.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[dict[str, Any]] = []

    def read_until(msg: str) -> dict[str, Any]:
        assert child.stdout is not None
        for line in child.stdout:
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
                if lines[-1].get("msg") == msg:
                    return lines[-1]
        raise AssertionError(f"the worker ended: {lines[-5:]}")

    try:
        await asyncio.wait_for(asyncio.to_thread(read_until, "listening"), 20)
        kept, lost = f"{bucket}.stored.report", f"{bucket}.unstored"
        await api.create(job(kept, payload={"n": 1}, mode="jetstream"))
        await api.create(job(lost, mode="jetstream", timeout="2s"))
        await api.trigger(kept)
        await api.trigger(lost)
        await events.wait(lambda: bool(events.of(kept) and events.of(lost)), 10, "events")
        (stored,) = events.of(kept)
        assert stored["outcome"] == "stored" and stored["stream"] == stream
        assert stored["seq"] >= 1 and stored["duplicate"] is False
        (failed,) = events.of(lost)
        assert failed["outcome"] == "failed" and "no stream captures" in failed["error"]
        consumed = await asyncio.wait_for(asyncio.to_thread(read_until, "stored fire"), 10)
        slot_ms = round(datetime.fromisoformat(stored["scheduled"]).timestamp() * 1000)
        assert consumed["msg_id"] == f"{kept}:{slot_ms}" and consumed["attempt"] == "1"
    finally:
        child.terminate()
        child.wait(10)
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream)


async def test_a_duplicate_pub_ack_counts_as_stored(nc: Client, bucket: str) -> None:
    """The same slot published twice (a failover, a retry): the stream keeps one copy and
    acknowledges the second as a duplicate, which is `stored` too."""
    js = nc.jetstream()
    stream = f"D_{bucket}".replace("-", "_")
    subject = f"{bucket}.dup"
    await js.add_stream(StreamConfig(name=stream, subjects=[subject]))
    history = History(nc, f"DH_{bucket}".replace("-", "_"), 10, prefix=f"ev.{bucket}")
    await history.ensure()
    deliveries = Deliveries(nc, limit=10)
    await deliveries.start()
    seen = Events()
    await seen.subscribe(nc, history.prefix)

    class Up:
        def is_leader_now(self) -> bool:
            return True

    firer = Firer(Wire(nc), Up(), "inst", history, RunStates(), deliveries=deliveries)
    try:
        document = job(subject, mode="jetstream")
        plan = Plans().of(make_job(document))
        slot = datetime.fromisoformat("2030-01-02T03:04:05.678+00:00")
        assert firer.write([Fire(plan, slot)])
        assert firer.write([Fire(plan, slot, attempt=2)])
        await seen.wait(lambda: len(seen.of(subject)) == 2, 5, "two acks")
        first, second = seen.of(subject)
        assert (first["outcome"], first["duplicate"], first["attempt"]) == ("stored", False, 1)
        assert (second["outcome"], second["duplicate"], second["attempt"]) == ("stored", True, 2)
        assert first["seq"] == second["seq"]
        assert (await js.stream_info(stream)).state.messages == 1
    finally:
        await deliveries.stop()
        await js.delete_stream(stream)
        await js.delete_stream(history.stream)


def test_replies_are_classified() -> None:
    assert classify("request", None, b"done", 0.1).outcome == "succeeded"
    failed = classify(
        "request", {"Nats-Service-Error": "bad", "Nats-Service-Error-Code": "400"}, b"", 0.1
    )
    assert (failed.outcome, failed.error) == ("failed", "400 bad")
    assert classify("request", {"Status": "503"}, b"", 0.0).outcome == "no_responders"
    assert classify("request", None, b"x" * 5000, 0.1).reply == b"x" * 1024
    assert classify("jetstream", None, b'{"stream":"S","seq":3}', 0.1).seq == 3
    error = classify(
        "jetstream",
        None,
        b'{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"}}',
        0.1,
    )
    assert error.outcome == "failed" and "10060" in (error.error or "")
    assert classify("jetstream", None, b"not json", 0.1).outcome == "failed"
    assert classify("jetstream", {"Status": "503"}, b"", 0.1).outcome == "failed"


# --- retries and dead letters -------------------------------------------------------------------


async def test_retries_with_backoff_then_a_dead_letter(
    cron: NatsCron, worker: Worker, events: Events, api: CronClient, nc: Client, bucket: str
) -> None:
    subject = f"{bucket}.work.always-fails"
    payload = {"fail": "always"}
    retry = {"attempts": 3, "backoff": "500ms", "multiplier": 2, "max_backoff": "5s"}
    await api.create(job(subject, payload=payload, mode="request", retry=retry))
    dead = await nc.subscribe(f"nats-cron.dead.{subject}")
    await nc.flush()
    await api.trigger(subject)

    await events.wait(lambda: bool(events.of(subject)), 5, "the first attempt's event")
    first = events.of(subject)[0]
    assert first["attempt"] == 1 and first["outcome"] == "failed" and first["attempts"] == 3
    assert "next_attempt" in first

    async def recorded() -> bool:
        record = await retry_record(nc, bucket, subject)
        return record is not None and record["runs"][0]["attempt"] == 2

    await eventually(recorded, 5, "the retry record of attempt 2")

    letter = await dead.next_msg(timeout=10)
    attempts = events.of(subject)
    assert [e["attempt"] for e in attempts] == [1, 2, 3]
    assert all(e["outcome"] == "failed" for e in attempts)
    assert attempts[2]["dead_letter"] == f"nats-cron.dead.{subject}"
    assert "next_attempt" not in attempts[2]
    times = [datetime.fromisoformat(e["actual"]).timestamp() for e in attempts]
    assert times[1] - times[0] >= 0.45  # backoff 500ms
    assert times[2] - times[1] >= 0.95  # then x2
    # The dead letter: the last attempt's payload and headers, plus its outcome.
    assert json.loads(letter.data) == payload
    headers = letter.headers or {}
    slot_ms = round(datetime.fromisoformat(first["scheduled"]).timestamp() * 1000)
    assert headers["Nats-Msg-Id"] == f"{subject}:{slot_ms}"
    assert headers["Nats-Cron-Run-Id"] == f"{subject}:{slot_ms}:3"
    assert headers["Nats-Cron-Attempt"] == "3"
    assert headers["Nats-Cron-Outcome"] == "failed"
    assert headers["Nats-Cron-Error"] == "500 always"
    assert headers["Nats-Cron-Job"] == subject
    # Each attempt reached the worker, with its number; the record is gone.
    assert [r["attempt"] for r in worker.requests(subject)] == [1, 2, 3]

    async def deleted() -> bool:
        return await retry_record(nc, bucket, subject) is None

    await eventually(deleted, 5, "the retry record deleted")
    got = await api.get(subject)
    assert got["consecutive_failures"] == 3 and got["last_outcome"] == "failed"
    assert got["run_count"] == 1  # one slot, three attempts
    text = cron.metrics.exposition()
    assert metric(text, "nats_cron_fires_total", subject=subject, outcome="failed") == 3


async def test_a_retry_that_succeeds_ends_the_run(
    cron: NatsCron, worker: Worker, events: Events, api: CronClient, nc: Client, bucket: str
) -> None:
    subject = f"{bucket}.work.flaky"
    retry = {"attempts": 4, "backoff": "300ms"}
    await api.create(job(subject, payload={"fail_attempts": 1}, mode="request", retry=retry))
    dead = await nc.subscribe(f"nats-cron.dead.{subject}")
    await nc.flush()
    await api.trigger(subject)
    await events.wait(lambda: bool(events.of(subject, "succeeded")), 5, "a success")
    assert [(e["attempt"], e["outcome"]) for e in events.of(subject)] == [
        (1, "failed"),
        (2, "succeeded"),
    ]
    got = await api.get(subject)
    assert got["consecutive_failures"] == 0 and got["last_outcome"] == "succeeded"

    async def deleted() -> bool:
        return await retry_record(nc, bucket, subject) is None

    await eventually(deleted, 5, "the retry record deleted")
    with pytest.raises(nats.errors.TimeoutError):
        await dead.next_msg(timeout=0.5)


# --- overlap ------------------------------------------------------------------------------------


async def test_overlap_skip_with_a_slow_worker(
    cron: NatsCron, worker: Worker, events: Events, api: CronClient, bucket: str
) -> None:
    skip, allow = f"{bucket}.work.skip", f"{bucket}.work.allow"
    slow = {"sleep": 2.2}
    await api.create(job(skip, "1s", slow, mode="request", timeout="10s", overlap="skip"))
    await api.create(job(allow, "1s", slow, mode="request", timeout="10s"))
    await events.wait(lambda: len(events.of(skip, "succeeded")) >= 2, 15, "two runs of skip")

    skipped = events.of(skip, "skipped")
    assert skipped, "slots of a job whose run was still going were skipped"
    assert all("still in progress" in e["error"] for e in skipped)
    assert not events.of(allow, "skipped")
    # Runs of the skip job never overlapped: each started after the previous one ended.
    runs = sorted(
        (datetime.fromisoformat(e["actual"]).timestamp(), e["duration"])
        for e in events.of(skip, "succeeded")
    )
    for (start, duration), (following, _) in itertools.pairwise(runs):
        assert following >= start + duration - 0.05
    # The other job's runs did overlap: more of them reached the worker meanwhile.
    assert len(worker.requests(allow)) > len(worker.requests(skip))
    text = cron.metrics.exposition()
    assert metric(text, "nats_cron_fires_total", subject=skip, outcome="skipped") >= 1
    assert (await api.get(skip))["last_outcome"] in ("skipped", "succeeded")


# --- the in-flight bound ------------------------------------------------------------------------


async def test_beyond_the_in_flight_bound_fires_wait_and_the_mark_holds(
    nats_url: str, bucket: str, nc: Client, events: Events, worker: Worker
) -> None:
    """With room for one request, a second due request waits until the first is answered;
    publish-mode jobs fire on time meanwhile, and the progress mark never covers the
    waiting slot before it was sent."""
    cron = NatsCron(settings_for(nats_url, bucket, max_in_flight=1))
    await cron.start()
    try:
        await leading(cron)
        api = CronClient(nc, timeout=5)
        first, second = f"{bucket}.work.first", f"{bucket}.work.second"
        ticker = f"{bucket}.ticker"
        ticks: list[tuple[float, float]] = []

        async def on_tick(msg: Msg) -> None:
            scheduled = datetime.fromisoformat((msg.headers or {})["Nats-Cron-Scheduled"])
            ticks.append((time.time(), scheduled.timestamp()))

        await nc.subscribe(ticker, cb=on_tick)
        await api.create(job(ticker, "1s"))
        for subject in (first, second):
            await api.create(job(subject, payload={"sleep": 1.5}, mode="request", timeout="5s"))
        await api.trigger(first)
        await api.trigger(second)
        term = cron.term
        assert term is not None
        marks: list[tuple[float, float]] = []  # (when, mark) while one of them waits
        while not events.of(second) or not events.of(first):
            assert cron.deliveries.in_flight <= 1
            if term.deferred and term.processed is not None:
                marks.append((time.time(), term.processed.handled.timestamp()))
            await asyncio.sleep(0.02)
            assert len(marks) < 1000, "never answered"
        a, b = sorted((events.of(first)[0], events.of(second)[0]), key=lambda e: e["actual"])
        sent_second = datetime.fromisoformat(b["actual"]).timestamp()
        assert sent_second >= datetime.fromisoformat(a["actual"]).timestamp() + 1.4
        assert term.deferred > 0
        # (The event's time has milliseconds; the slot itself, microseconds.)
        waiting_slot = datetime.fromisoformat(b["scheduled"]).timestamp() + 0.001
        held = [mark for when, mark in marks if when < sent_second - 0.05]
        assert held and all(mark < waiting_slot for mark in held), (held[-3:], waiting_slot)
        # The publish job kept firing on time while the request waited for room.
        assert any(sent_second - 1.5 <= at <= sent_second for at, _ in ticks)
        assert max(at - scheduled for at, scheduled in ticks) < 0.5
    finally:
        await cron.stop()


# --- what publish mode costs --------------------------------------------------------------------


async def test_publish_fires_write_nothing_per_job(cron: NatsCron, nc: Client, bucket: str) -> None:
    """Publish-mode fires write no KV record per job: the jobs bucket does not move, the
    leader bucket only by progress marks (and no retry record); one event per fire."""
    js = nc.jetstream()
    fires: list[float] = []

    async def on_fire(msg: Msg) -> None:
        fires.append(time.time())

    await nc.subscribe(f"{bucket}.pub.>", cb=on_fire)
    await nc.flush()
    for n in range(40):
        await cron.jobs.create(job(f"{bucket}.pub.{n}", "1s"))
    await cron.store.aflush()

    async def firing() -> bool:
        return len(fires) >= 40

    await eventually(firing, 5, "every job fired once")
    jobs0 = (await js.stream_info(f"KV_{bucket}-jobs")).state.last_seq
    lead0 = (await js.stream_info(f"KV_{bucket}-leader")).state.last_seq
    ev0 = (await js.stream_info(cron.settings.events_stream)).state.last_seq
    count0, started = len(fires), time.monotonic()

    async def three_rounds() -> bool:
        return len(fires) >= count0 + 120

    await eventually(three_rounds, 10, "three more rounds")
    fired, elapsed = len(fires) - count0, time.monotonic() - started
    jobs1 = (await js.stream_info(f"KV_{bucket}-jobs")).state.last_seq
    lead1 = (await js.stream_info(f"KV_{bucket}-leader")).state.last_seq
    assert jobs1 == jobs0, "a fire wrote the jobs bucket"
    marks = elapsed / 0.2 + 3  # one progress mark per 200 ms, whatever the number of jobs
    assert lead1 - lead0 <= marks, (lead1 - lead0, fired)
    assert await retry_record(nc, bucket, f"{bucket}.pub.0") is None

    async def events_in() -> bool:
        last = (await js.stream_info(cron.settings.events_stream)).state.last_seq
        return last - ev0 >= fired

    await eventually(events_in, 5, "one event per fire")
    print(f"{fired} fires in {elapsed:.2f}s: {lead1 - lead0} leader-bucket writes, 0 job writes")


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delivery", "words"),
    [
        ({"mode": "smoke-signal"}, "delivery.mode"),
        ({"mode": "request", "timeout": "0s"}, "delivery.timeout"),
        ({"mode": "request", "retry": {"attempts": 0}}, "delivery.retry.attempts"),
        ({"mode": "request", "retry": {"attempts": 2, "multiplier": 0.5}}, "multiplier"),
        ({"overlap": "skip"}, "delivery.overlap"),
        ({"retry": {"attempts": 2}}, "delivery.retry: needs mode request or jetstream"),
    ],
)
async def test_bad_delivery_documents_are_refused(
    cron: NatsCron, api: CronClient, bucket: str, delivery: dict[str, Any], words: str
) -> None:
    subject = f"{bucket}.bad"
    document = {**job(subject), "delivery": delivery}
    for send in (api.create, api.update):
        with pytest.raises(ApiError) as caught:
            await send(document)
        assert caught.value.code == 400 and words in caught.value.message
    with pytest.raises(ApiError) as dry:
        await api.create(document, dry_run=True)
    assert dry.value.code == 400
    assert cron.jobs.count() == 0


# --- the CLI ------------------------------------------------------------------------------------


async def test_the_cli_shows_outcomes(
    cron: NatsCron, worker: Worker, events: Events, api: CronClient, bucket: str, tmp_path: Path
) -> None:
    subject = f"{bucket}.work.shown"
    await api.create(job(subject, payload={"fail": "disk full"}, mode="request"))
    await api.trigger(subject)
    await events.wait(lambda: bool(events.of(subject)), 5, "the run's event")
    cli = Cli(cli_env(tmp_path, cron.settings.connection.url))
    history = await asyncio.to_thread(cli.ok, "history", subject)
    header, row = [line for line in history.out.splitlines() if line.strip()][:2]
    assert "ATTEMPT" in header and "OUTCOME" in header
    assert "failed in" in row and "500 disk full" in row
    listed = await asyncio.to_thread(cli.ok, "list", subject)
    assert "LAST OUTCOME" in listed.out and "failed: 500 disk full" in listed.out
    shown = await asyncio.to_thread(cli.ok, "get", subject)
    assert "delivery: request, timeout 30s" in shown.out
    assert "consecutive failures: 1" in shown.out and "last success: never" in shown.out


# --- failover -----------------------------------------------------------------------------------


@pytest.fixture
def serve_env(nats_url: str, bucket: str) -> dict[str, str]:
    return {
        "NATS_URL": nats_url,
        "NATS_CRON_JOBS_BUCKET": f"{bucket}-jobs",
        "NATS_CRON_LEADER_BUCKET": f"{bucket}-leader",
        "NATS_CRON_EVENTS_STREAM": f"E_{bucket}".replace("-", "_"),
        "NATS_CRON_EVENTS_PREFIX": f"ev.{bucket}",
        "NATS_CRON_LEASE_TTL": "2s",
        "LOG_LEVEL": "info",
    }


@pytest.fixture
def instances(serve_env: dict[str, str]) -> Iterator[list[ServeProcess]]:
    started = [ServeProcess(f"d{n}", serve_env) for n in range(2)]
    yield started
    for proc in started:
        proc.stop()


async def test_a_retry_survives_a_leader_killed_between_attempts(
    instances: list[ServeProcess],
    worker: Worker,
    events: Events,
    api: CronClient,
    nc: Client,
    bucket: str,
) -> None:
    await asyncio.gather(*(p.await_log("nats-cron instance started") for p in instances))

    async def led() -> bool:
        return (await api.status())["leader"] is not None

    await eventually(led, 10, "a leader")
    subject = f"{bucket}.work.killed"
    retry = {"attempts": 3, "backoff": "4s", "max_backoff": "4s", "multiplier": 1}
    document = job(subject, payload={"fail": "always"}, mode="request", retry=retry)
    # A slot of its schedule, not a trigger: a triggered slot rewrites the job's record,
    # and a leader that dies before its progress mark covers that record's revision has
    # its successor fire the slot again (at least once per slot), attempt 1 included.
    start = datetime.fromtimestamp(time.time() + 2.5, UTC)
    document["schedule"]["start"] = start.isoformat()
    dead = await nc.subscribe(f"nats-cron.dead.{subject}")
    await nc.flush()
    await api.create(document)
    await events.wait(lambda: bool(events.of(subject)), 10, "the first attempt")
    first = events.of(subject)[0]
    assert first["attempt"] == 1 and first["outcome"] == "failed"

    async def recorded() -> bool:
        return await retry_record(nc, bucket, subject) is not None

    await eventually(recorded, 3, "the retry record")
    leader = next(p for p in instances if p.instance_id == first["instance"])
    survivor = next(p for p in instances if p is not leader)
    leader.signal(signal.SIGKILL)
    await leader.wait_exit()

    letter = await dead.next_msg(timeout=20)
    attempts = events.of(subject)
    assert [e["attempt"] for e in attempts] == [1, 2, 3], [
        (e["attempt"], e["instance"], e["scheduled"], e["actual"], e["outcome"]) for e in attempts
    ]
    assert {e["instance"] for e in attempts[1:]} == {survivor.instance_id}
    assert (letter.headers or {})["Nats-Cron-Attempt"] == "3"
    # Every attempt reached the worker (at least once each).
    assert {r["attempt"] for r in worker.requests(subject)} == {1, 2, 3}
    await survivor.await_log("leading: firing")
    assert survivor.find("leading: firing")[-1].get("retries") == 1
