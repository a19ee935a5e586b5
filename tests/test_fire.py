"""What a fire does, against a real nats-server: headers, payloads, fencing, run state,
history and JetStream de-duplication of a slot; plus the pure jitter function.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest
from apscheduler.events import EVENT_ALL, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, JobEvent
from apscheduler.job import Job
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.background import BackgroundScheduler
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import StreamConfig
from ulid import ULID

from nats_apscheduler.errors import NotLeaderError
from nats_apscheduler.fire import (
    FIRE_REF,
    FireExecutor,
    Firer,
    History,
    fire,
    jitter_delay,
    rfc3339,
)
from nats_apscheduler.spec import parse_job

# A slot on a whole millisecond; its unix time in ms, computed without floats.
SLOT = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
SLOT_MS = (SLOT - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def make_job(document: dict[str, Any], next_run_time: datetime | None = None) -> Job:
    """A nats-cron job as the store holds it, owned by a scheduler that is never started."""
    spec = parse_job(document)
    return Job(
        BackgroundScheduler(timezone=UTC),
        id=spec.subject,
        func=FIRE_REF,
        trigger=spec.trigger(SLOT),
        executor="nats",
        args=(),
        kwargs={"job": spec.to_document(), "state": {}},
        name=spec.subject,
        misfire_grace_time=60,
        coalesce=True,
        max_instances=1,
        next_run_time=next_run_time,
    )


def doc(subject: str, payload: dict[str, Any] | None = None, **schedule: str) -> dict[str, Any]:
    document: dict[str, Any] = {
        "target": {"subject": subject},
        "schedule": schedule or {"every": "1m"},
    }
    if payload is not None:
        document["payload"] = payload
    return document


class Fence:
    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.calls: list[float] = []

    def __call__(self) -> bool:
        self.calls.append(time.monotonic())
        return self.up


@pytest.fixture
async def publisher(nats_url: str) -> AsyncIterator[Client]:
    """The firing instance's own connection (the tests subscribe on `nc`)."""
    client = await nats.connect(nats_url)
    yield client
    if not client.is_closed:
        await client.close()


def firer_for(
    publisher: Client,
    fence: Fence | None = None,
    persisted: list[Job] | None = None,
    history: History | None = None,
) -> Firer:
    return Firer(
        publisher,
        "inst-1",
        fence=fence or Fence(),
        epoch=lambda: 42,
        persist=(persisted if persisted is not None else []).append,
        history=history,
    )


async def settle(nc: Client) -> None:
    """Make sure the server has processed everything `nc` sent so far.

    nats-py 2.16 writes flush()'s PING straight to the socket, ahead of commands still
    queued for its flusher task (a SUB just made), so one flush can return before the
    server saw the SUB, and a message published right after is lost (~1% here). By the
    time the first PONG is back the queue has been written: the second PING follows it.
    """
    await nc.flush()
    await nc.flush()


async def subscribe(nc: Client, subject: str) -> Subscription:
    sub = await nc.subscribe(subject)
    await settle(nc)  # the interest reached the server before anything is published
    return sub


# --- jitter ---------------------------------------------------------------------------------


def test_jitter_is_deterministic_bounded_and_spread() -> None:
    jitter = timedelta(seconds=10)
    first = jitter_delay("a.b", SLOT, jitter)
    assert first == jitter_delay("a.b", SLOT, jitter)  # the same on every instance
    delays = [jitter_delay("a.b", SLOT + timedelta(minutes=n), jitter) for n in range(500)]
    assert all(0 <= d < 10 for d in delays)
    assert len(set(delays)) == len(delays)
    # Spread over the window: every tenth of it is used.
    assert {int(d) for d in delays} == set(range(10))
    assert 3.5 < sum(delays) / len(delays) < 6.5
    # Different jobs at the same slot get different delays (no thundering herd).
    per_subject = {jitter_delay(f"job.{n}", SLOT, jitter) for n in range(100)}
    assert len(per_subject) == 100
    assert jitter_delay("a.b", SLOT, timedelta(0)) == 0.0
    assert jitter_delay("a.b", SLOT, timedelta(seconds=-1)) == 0.0
    # Scales with the window: the same fraction of it.
    assert jitter_delay("a.b", SLOT, timedelta(seconds=20)) == pytest.approx(first * 2)


# --- publishing -----------------------------------------------------------------------------


async def test_fire_publishes_headers_and_json_payload(
    nc: Client, publisher: Client, bucket: str
) -> None:
    subject = f"{bucket}.cleanup"
    sub = await subscribe(nc, subject)
    persisted: list[Job] = []
    job = make_job(doc(subject, {"type": "json", "data": '{"table": "sessions"}'}))
    outcome = await firer_for(publisher, persisted=persisted).fire(job, SLOT)
    assert outcome.status == "fired" and outcome.error is None
    msg = await sub.next_msg(timeout=2)
    assert msg.data == b'{"table": "sessions"}'  # published as given
    assert msg.headers == {
        "Nats-Msg-Id": f"{subject}:{SLOT_MS}",
        "Nats-Cron-Job": subject,
        "Nats-Cron-Scheduled": "2030-01-02T03:04:05.678Z",
        "Nats-Cron-Instance": "inst-1",
        "Nats-Cron-Epoch": "42",
    }
    assert persisted == [job]


@pytest.mark.parametrize(
    ("payload", "body"),
    [
        ({"type": "text", "data": "héllo wörld"}, "héllo wörld".encode()),
        ({"type": "base64", "data": base64.b64encode(b"\x00\xffbin").decode()}, b"\x00\xffbin"),
        ({"data": "raw {not json"}, b"raw {not json"),
        ({"type": "json", "data": {"n": 1}}, b'{"n":1}'),
    ],
    ids=["text", "base64", "untyped", "json-value"],
)
async def test_fire_payload_types(
    nc: Client, publisher: Client, bucket: str, payload: dict[str, Any], body: bytes
) -> None:
    subject = f"{bucket}.payload"
    sub = await subscribe(nc, subject)
    outcome = await firer_for(publisher).fire(make_job(doc(subject, payload)), SLOT)
    assert outcome.status == "fired"
    assert (await sub.next_msg(timeout=2)).data == body


@pytest.mark.parametrize("payload", [None, {"type": "json", "data": ""}], ids=["none", "empty"])
async def test_fire_without_payload_sends_ulid_of_slot(
    nc: Client, publisher: Client, bucket: str, payload: dict[str, Any] | None
) -> None:
    subject = f"{bucket}.ulid"
    sub = await subscribe(nc, subject)
    firer = firer_for(publisher)
    await firer.fire(make_job(doc(subject, payload)), SLOT)
    await firer.fire(make_job(doc(subject, payload)), SLOT + timedelta(seconds=1))
    first = (await sub.next_msg(timeout=2)).data.decode()
    second = (await sub.next_msg(timeout=2)).data.decode()
    for body in (first, second):
        assert len(body) == 26 and body == body.upper()
        assert set(body) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
    assert ULID.from_str(first).datetime == SLOT
    assert ULID.from_str(second).datetime == SLOT + timedelta(seconds=1)
    assert first != second


async def test_fenced_fire_does_not_publish_and_hands_the_slot_back(
    nc: Client, publisher: Client, bucket: str
) -> None:
    subject = f"{bucket}.fenced"
    sub = await subscribe(nc, subject)
    persisted: list[Job] = []
    # APScheduler moves next_run_time past the slot before it submits the job.
    job = make_job(doc(subject), next_run_time=SLOT + timedelta(minutes=1))
    fence = Fence(up=False)
    outcome = await firer_for(publisher, fence, persisted).fire(job, SLOT)
    assert outcome.status == "fenced"
    assert fence.calls
    assert job.next_run_time == SLOT  # the next leader fires this slot
    assert persisted == [job]
    assert job.kwargs["state"] == {}  # nothing recorded as run
    # Anything the firer had published would arrive before this marker (one connection,
    # in order): the first message is the marker.
    await publisher.publish(subject, b"marker")
    assert (await sub.next_msg(timeout=2)).data == b"marker"


async def test_fence_is_checked_after_the_jitter_delay(
    nc: Client, publisher: Client, bucket: str
) -> None:
    subject = f"{bucket}.jitter"
    sub = await subscribe(nc, subject)
    job = make_job(doc(subject, every="1m", jitter="300ms"))
    delay = jitter_delay(subject, SLOT, timedelta(milliseconds=300))
    fence = Fence()
    began = time.monotonic()
    outcome = await firer_for(publisher, fence).fire(job, SLOT)
    assert outcome.status == "fired"
    assert fence.calls[0] - began >= delay - 0.005
    assert (await sub.next_msg(timeout=2)).headers["Nats-Cron-Scheduled"] == rfc3339(SLOT)


async def test_run_state_is_recorded_and_persisted(
    nc: Client, publisher: Client, bucket: str
) -> None:
    subject = f"{bucket}.state"
    persisted: list[Job] = []
    job = make_job(doc(subject))
    firer = firer_for(publisher, persisted=persisted)
    before = datetime.now(UTC)
    await firer.fire(job, SLOT)
    second_slot = SLOT + timedelta(minutes=1)
    await firer.fire(job, second_slot)
    state = job.kwargs["state"]
    assert state["run_count"] == 2
    assert state["last_scheduled"] == rfc3339(second_slot)
    assert state["last_error"] is None
    last_run = datetime.fromisoformat(state["last_run"])
    assert before - timedelta(seconds=1) <= last_run <= datetime.now(UTC) + timedelta(seconds=1)
    assert len(persisted) == 2 and persisted[-1] is job
    # The document itself is untouched.
    assert job.kwargs["job"]["target"] == {"subject": subject}

    # A failed publish is recorded as the last error and does not count as a run.
    await publisher.close()
    outcome = await firer.fire(job, second_slot + timedelta(minutes=1))
    assert outcome.status == "error"
    state = job.kwargs["state"]
    assert state["run_count"] == 2
    assert state["last_error"] and "publish failed" in state["last_error"]
    assert len(persisted) == 3


async def test_invalid_document_is_refused(publisher: Client, bucket: str) -> None:
    job = make_job(doc(f"{bucket}.a"))
    job.kwargs = {**job.kwargs, "job": doc(f"{bucket}.other")}  # does not match the id
    persisted: list[Job] = []
    outcome = await firer_for(publisher, persisted=persisted).fire(job, SLOT)
    assert outcome.status == "invalid"
    assert persisted == []


async def test_module_fire_refuses() -> None:
    with pytest.raises(NotLeaderError):
        await fire(job={"target": {"subject": "a.b"}}, state={})


# --- JetStream ------------------------------------------------------------------------------


async def wait_stored(js: Any, stream: str, subject: str, msg_id: str) -> None:
    """Consume `subject` from the stream until the message `msg_id` is there: everything
    the same connection published before it is stored by then."""
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    try:
        while True:
            msg: Msg = await sub.next_msg(timeout=3)
            if (msg.headers or {}).get("Nats-Msg-Id") == msg_id or msg.data == msg_id.encode():
                return
    finally:
        await sub.unsubscribe()


async def test_stream_drops_a_duplicate_fire_of_one_slot(
    nc: Client, publisher: Client, bucket: str
) -> None:
    js = nc.jetstream()
    stream = f"FIRES_{bucket}".replace("-", "_")
    subject = f"{bucket}.dedup"
    await js.add_stream(StreamConfig(name=stream, subjects=[subject]))
    try:
        # Two leaders (or one, twice) firing the same slot; then the next slot.
        for fired_by in ("inst-1", "inst-2"):
            firer = Firer(publisher, fired_by, lambda: True, lambda: 7, lambda job: None)
            assert (await firer.fire(make_job(doc(subject)), SLOT)).status == "fired"
        later = SLOT + timedelta(minutes=1)
        await firer_for(publisher).fire(make_job(doc(subject)), later)
        later_ms = (later - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
        await wait_stored(js, stream, subject, f"{subject}:{later_ms}")
        info = await js.stream_info(stream)
        assert info.state.messages == 2
        first = await js.get_msg(stream, seq=1)
        assert first.headers is not None
        assert first.headers["Nats-Msg-Id"] == f"{subject}:{SLOT_MS}"
        assert first.headers["Nats-Cron-Instance"] == "inst-1"  # the copy kept is the first
    finally:
        await js.delete_stream(stream)


@pytest.fixture
async def history(nc: Client, bucket: str) -> AsyncIterator[History]:
    stream = f"H_{bucket}".replace("-", "_")
    h = History(nc, stream, depth=3)
    await h.ensure()
    await h.ensure()  # idempotent: a second instance starting up
    yield h
    await nc.jetstream().delete_stream(stream)


async def test_history_newest_first_and_depth_limited(history: History, nc: Client) -> None:
    js = nc.jetstream()
    for n in range(5):
        await history.append("jobs.a", {"n": n})
    for n in range(2):
        await history.append("jobs.b", {"n": n})
    await history.append("jobs.end", {"n": "end"})
    end = json.dumps({"n": "end"})
    await wait_stored(js, history.stream, f"{history.prefix}.>", end)
    # Read repeatedly: each read must see every stored record, whatever the timing of the
    # consumer's first push relative to its info request.
    reads = [await history.read("jobs.a", 10) for _ in range(50)]
    assert [n for n, got in enumerate(reads) if got != [{"n": 4}, {"n": 3}, {"n": 2}]] == []
    assert await history.read("jobs.a", 2) == [{"n": 4}, {"n": 3}]
    assert await history.read("jobs.b", 10) == [{"n": 1}, {"n": 0}]
    assert await history.read("jobs.none", 10) == []
    info = await js.stream_info(history.stream)
    assert info.config.max_msgs_per_subject == 3
    assert info.state.messages == 3 + 2 + 1


async def test_firer_appends_history(
    history: History, nc: Client, publisher: Client, bucket: str
) -> None:
    subject = f"{bucket}.hist"
    firer = firer_for(publisher, history=history)
    await firer.fire(make_job(doc(subject)), SLOT)
    await history.append("marker", {"n": "end"})  # on the same connection as History's
    await wait_stored(nc.jetstream(), history.stream, f"{history.prefix}.>", '{"n": "end"}')
    # Read it straight from the stream (History.read is covered above).
    stored = await nc.jetstream().get_last_msg(history.stream, f"{history.prefix}.{subject}")
    record = json.loads(stored.data)
    assert record["subject"] == subject
    assert record["scheduled"] == rfc3339(SLOT)
    assert record["instance"] == "inst-1" and record["epoch"] == 42
    assert record["outcome"] == "fired" and record["error"] is None


# --- the executor ---------------------------------------------------------------------------


async def test_executor_skips_slots_past_grace_and_fires_the_rest(
    nc: Client, publisher: Client, bucket: str
) -> None:
    subject = f"{bucket}.exec"
    sub = await subscribe(nc, subject)
    scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop(), timezone=UTC)
    events: list[JobEvent] = []
    scheduler.add_listener(events.append, EVENT_ALL)
    executor = FireExecutor(firer_for(publisher))
    executor.start(scheduler, "nats")
    job = make_job(doc(subject))  # misfire_grace_time=60
    now = datetime.now(UTC).replace(microsecond=0)
    stale, fresh = now - timedelta(minutes=5), now - timedelta(seconds=5)
    executor.submit_job(job, [stale, fresh])
    await executor.drain(timeout=5)
    msg = await sub.next_msg(timeout=2)
    assert msg.headers is not None and msg.headers["Nats-Cron-Scheduled"] == rfc3339(fresh)
    assert [(e.code, e.scheduled_run_time) for e in events] == [
        (EVENT_JOB_MISSED, stale),
        (EVENT_JOB_EXECUTED, fresh),
    ]
    assert job.kwargs["state"]["run_count"] == 1
    await publisher.publish(subject, b"marker")  # the stale slot was not published
    assert (await sub.next_msg(timeout=2)).data == b"marker"
