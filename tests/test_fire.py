"""What a fire is, against a real nats-server: headers, payloads, the fence, history records
and run state, JetStream de-duplication of a slot, the write-through wire; plus the pure
jitter, ULID and fire-plan functions.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import StreamConfig
from ulid import ULID

from nats_apscheduler._wire import Wire, pub
from nats_apscheduler.errors import NotLeaderError, SpecError
from nats_apscheduler.fire import (
    FIRE_REF,
    Fire,
    FirePlan,
    Firer,
    Plans,
    Skip,
    fire,
    jitter_delay,
    rfc3339,
    ulid,
)
from nats_apscheduler.history import History, RunStates
from nats_apscheduler.spec import parse_job

# A slot on a whole millisecond; its unix time in ms, computed without floats.
SLOT = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
SLOT_MS = (SLOT - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def make_job(document: dict[str, Any]) -> Job:
    """A nats-cron job as the store holds it, owned by a scheduler that is never started."""
    spec = parse_job(document)
    return Job(
        BackgroundScheduler(timezone=UTC),
        id=spec.subject,
        func=FIRE_REF,
        trigger=spec.trigger(SLOT),
        executor="nats",
        args=(),
        kwargs={"job": spec.to_document()},
        name=spec.subject,
        misfire_grace_time=60,
        coalesce=True,
        max_instances=1,
        next_run_time=SLOT,
    )


def doc(subject: str, payload: dict[str, Any] | None = None, **schedule: str) -> dict[str, Any]:
    document: dict[str, Any] = {
        "target": {"subject": subject},
        "schedule": schedule or {"every": "1m"},
    }
    if payload is not None:
        document["payload"] = payload
    return document


def plan(document: dict[str, Any]) -> FirePlan:
    return Plans().of(make_job(document))


class Fence:
    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.calls = 0

    def is_leader_now(self) -> bool:
        self.calls += 1
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
    history: History | None = None,
    states: RunStates | None = None,
    instance: str = "inst-1",
) -> Firer:
    firer = Firer(Wire(publisher), fence or Fence(), instance, history, states or RunStates())
    firer.epoch = 42
    return firer


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


# --- pure ---------------------------------------------------------------------------------------


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
    assert jitter_delay("a.b", SLOT, 10.0) == first


def test_ulid_of_a_slot() -> None:
    bodies = {ulid(SLOT_MS).decode() for _ in range(1000)}
    assert len(bodies) == 1000
    for body in list(bodies)[:50]:
        assert len(body) == 26 and set(body) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
        assert ULID.from_str(body).datetime == SLOT
    assert ULID.from_str(ulid(0).decode()).milliseconds == 0
    assert ULID.from_str(ulid(2**48 - 1).decode()).milliseconds == 2**48 - 1


def test_fire_plan_of_a_stored_document() -> None:
    text = plan(doc("a.b", {"type": "text", "data": "héllo"}, every="1m", jitter="1500ms"))
    assert text == FirePlan("a.b", "héllo".encode(), 1.5)
    assert plan(doc("a.b")).body is None
    job = make_job(doc("a.b"))
    with pytest.raises(SpecError, match="does not match"):
        FirePlan.of(job.id, doc("a.other"))
    with pytest.raises(SpecError, match="reserved"):
        FirePlan.of("$JS.API.x", doc("$JS.API.x"))
    with pytest.raises(SpecError):
        bad = {"type": "base64", "data": "!"}
        FirePlan.of("a.b", {"target": {"subject": "a.b"}, "payload": bad})
    with pytest.raises(SpecError):
        FirePlan.of("a.b", None)


def test_plans_are_read_once_per_document_version() -> None:
    plans = Plans()
    job = make_job(doc("a.b", {"type": "text", "data": "v1"}))
    first = plans.of(job)
    assert plans.of(job) is first
    job.kwargs = {"job": doc("a.b", {"type": "text", "data": "v2"})}
    assert plans.of(job).body == b"v2"


def test_writing_is_synchronous() -> None:
    """No await between the fence check and the socket write: `write` is a plain call."""
    assert not inspect.iscoroutinefunction(Firer.write)
    assert not inspect.iscoroutinefunction(Wire.write)


async def test_module_fire_refuses() -> None:
    with pytest.raises(NotLeaderError):
        await fire(job={"target": {"subject": "a.b"}})


# --- publishing ---------------------------------------------------------------------------------


async def test_fire_publishes_headers_and_json_payload(
    nc: Client, publisher: Client, bucket: str
) -> None:
    subject = f"{bucket}.cleanup"
    sub = await subscribe(nc, subject)
    fire_plan = plan(doc(subject, {"type": "json", "data": '{"table": "sessions"}'}))
    assert firer_for(publisher).write([Fire(fire_plan, SLOT)])
    msg = await sub.next_msg(timeout=2)
    assert msg.data == b'{"table": "sessions"}'  # published as given
    assert msg.headers == {
        "Nats-Msg-Id": f"{subject}:{SLOT_MS}",
        "Nats-Cron-Job": subject,
        "Nats-Cron-Scheduled": "2030-01-02T03:04:05.678Z",
        "Nats-Cron-Instance": "inst-1",
        "Nats-Cron-Epoch": "42",
        "Nats-Cron-Shard": "0",
        "Nats-Cron-Run-Id": f"{subject}:{SLOT_MS}:1",
        "Nats-Cron-Attempt": "1",
    }


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
    assert firer_for(publisher).write([Fire(plan(doc(subject, payload)), SLOT)])
    assert (await sub.next_msg(timeout=2)).data == body


@pytest.mark.parametrize("payload", [None, {"type": "json", "data": ""}], ids=["none", "empty"])
async def test_fire_without_payload_sends_ulid_of_slot(
    nc: Client, publisher: Client, bucket: str, payload: dict[str, Any] | None
) -> None:
    subject = f"{bucket}.ulid"
    sub = await subscribe(nc, subject)
    fire_plan = plan(doc(subject, payload))
    later = SLOT + timedelta(seconds=1)
    firer_for(publisher).write([Fire(fire_plan, SLOT), Fire(fire_plan, later)])
    first = (await sub.next_msg(timeout=2)).data.decode()
    second = (await sub.next_msg(timeout=2)).data.decode()
    assert ULID.from_str(first).datetime == SLOT
    assert ULID.from_str(second).datetime == SLOT + timedelta(seconds=1)
    assert first != second


async def test_a_whole_batch_leaves_in_order(nc: Client, publisher: Client, bucket: str) -> None:
    sub = await subscribe(nc, f"{bucket}.herd.>")
    plans = [plan(doc(f"{bucket}.herd.{n}")) for n in range(500)]
    assert firer_for(publisher).write([Fire(p, SLOT) for p in plans])
    got = [(await sub.next_msg(timeout=2)).subject for _ in range(500)]
    assert got == [p.subject for p in plans]


async def test_a_fenced_batch_writes_nothing(nc: Client, publisher: Client, bucket: str) -> None:
    subject = f"{bucket}.fenced"
    sub = await subscribe(nc, subject)
    fence = Fence(up=False)
    states = RunStates()
    assert not firer_for(publisher, fence, states=states).write([Fire(plan(doc(subject)), SLOT)])
    assert fence.calls == 1 and states.get(subject) is None
    # Anything the firer had written would arrive before this marker (one connection, in
    # order): the first message is the marker.
    await publisher.publish(subject, b"marker")
    assert (await sub.next_msg(timeout=2)).data == b"marker"


async def test_nothing_is_written_without_a_connection(publisher: Client, bucket: str) -> None:
    firer = firer_for(publisher)
    await publisher.close()
    assert not firer.write([Fire(plan(doc(f"{bucket}.gone")), SLOT)])


async def test_the_wire_keeps_the_connection_order(
    nc: Client, publisher: Client, bucket: str
) -> None:
    """What nats-py queued before goes out before what the wire writes."""
    subject = f"{bucket}.order"
    sub = await subscribe(nc, subject)
    wire = Wire(publisher)
    for n in range(20):
        await publisher.publish(subject, f"queued {n}".encode())  # in nats-py's buffer
        wire.write([pub(subject, f"wired {n}".encode())], messages=1)
    got = [(await sub.next_msg(timeout=2)).data.decode() for _ in range(40)]
    assert got == [f"{kind} {n}" for n in range(20) for kind in ("queued", "wired")]


async def test_run_state_follows_the_fires(publisher: Client, bucket: str) -> None:
    subject = f"{bucket}.state"
    states = RunStates()
    firer = firer_for(publisher, states=states)
    fire_plan = plan(doc(subject))
    before = datetime.now(UTC)
    firer.write([Fire(fire_plan, SLOT)])
    second = SLOT + timedelta(minutes=1)
    firer.write([Fire(fire_plan, second, caught_up=True)])
    state = states.get(subject)
    assert state is not None
    assert state.run_count == 2 and state.last_scheduled == rfc3339(second)
    assert state.last_outcome == "caught_up" and state.last_error is None
    last_run = datetime.fromisoformat(state.last_run or "")
    assert before - timedelta(seconds=1) <= last_run <= datetime.now(UTC) + timedelta(seconds=1)
    firer.write([], [Skip(subject, 3, SLOT, second, more=False, past_grace=True)])
    assert states.get(subject).last_outcome == "missed"  # type: ignore[union-attr]
    assert states.get(subject).run_count == 2  # type: ignore[union-attr]


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
        fire_plan = plan(doc(subject))
        for fired_by in ("inst-1", "inst-2"):
            assert firer_for(publisher, instance=fired_by).write([Fire(fire_plan, SLOT)])
        later = SLOT + timedelta(minutes=1)
        firer_for(publisher).write([Fire(fire_plan, later)])
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


async def append(history: History, nc: Client, subject: str, record: dict[str, Any]) -> None:
    await nc.publish(history.subject(subject), json.dumps(record).encode())


async def test_history_newest_first_depth_limited_and_purged(history: History, nc: Client) -> None:
    js = nc.jetstream()
    for n in range(5):
        await append(history, nc, "jobs.a", {"n": n})
    for n in range(2):
        await append(history, nc, "jobs.b", {"n": n})
    await append(history, nc, "jobs.end", {"n": "end"})
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
    await history.purge("jobs.a")
    assert await history.read("jobs.a", 10) == []
    assert await history.read("jobs.b", 10) == [{"n": 1}, {"n": 0}]


async def test_history_records_rebuild_the_run_state(
    history: History, nc: Client, publisher: Client, bucket: str
) -> None:
    subject = f"{bucket}.hist"
    leader_states = RunStates()
    firer = firer_for(publisher, history=history, states=leader_states)
    fire_plan = plan(doc(subject))
    firer.write([Fire(fire_plan, SLOT)])
    firer.write(
        [Fire(fire_plan, SLOT + timedelta(minutes=2), caught_up=True)],
        [Skip(subject, 1, SLOT + timedelta(minutes=1), SLOT + timedelta(minutes=1), False, False)],
    )
    await append(history, publisher, "marker", {"n": "end"})
    await wait_stored(nc.jetstream(), history.stream, f"{history.prefix}.>", '{"n": "end"}')
    records = await history.read(subject, 10)
    assert [r["outcome"] for r in records] == ["caught_up", "missed", "fired"]
    assert records[2]["scheduled"] == rfc3339(SLOT) and records[2]["runs"] == 1
    assert records[2]["instance"] == "inst-1" and records[2]["epoch"] == 42
    assert records[0]["runs"] == 2 and records[1]["skipped"] == 1 and records[1]["runs"] == 1
    # A follower rebuilds the same run state from the stream.
    follower = RunStates(history)
    await follower.follow(nc)
    try:
        assert await follower.catch_up(timeout=5)
        mine, theirs = leader_states.get(subject), follower.get(subject)
        assert theirs is not None and mine is not None
        assert theirs.run_count == mine.run_count == 2
        assert theirs.last_scheduled == mine.last_scheduled
        assert theirs.last_outcome == mine.last_outcome == "caught_up"
        # A record of skipped slots alone keeps the run state.
        firer.write([], [Skip(subject, 2, SLOT, SLOT, False, True)])
        # ...and follows new records live.
        firer.write([Fire(fire_plan, SLOT + timedelta(minutes=3))])
        for _ in range(100):
            if follower.get(subject).last_outcome == "fired":  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.02)
        for _ in range(100):
            if follower.get(subject).run_count == 3:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.02)
        assert follower.get(subject).run_count == 3  # type: ignore[union-attr]
    finally:
        await follower.pause()
