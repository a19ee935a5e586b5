"""Three real `nats-cron serve` processes on one nats-server: election, fencing, failover."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest
from nats.aio.client import Client

from nats_apscheduler.client import CronClient
from nats_apscheduler.errors import ApiError
from tests.helpers.cluster import FireRecorder, ServeProcess

TTL = 2  # seconds; the product default is 3


@pytest.fixture
def env(nats_url: str, bucket: str) -> dict[str, str]:
    return {
        "NATS_URL": nats_url,
        "NATS_CRON_JOBS_BUCKET": f"{bucket}-jobs",
        "NATS_CRON_LEADER_BUCKET": f"{bucket}-leader",
        "NATS_CRON_EVENTS_STREAM": f"H{bucket}".replace("-", "_"),
        "NATS_CRON_EVENTS_PREFIX": f"ev.{bucket}",
        "NATS_CRON_LEASE_TTL": f"{TTL}s",
        "LOG_LEVEL": "info",
    }


@pytest.fixture
def procs(env: dict[str, str]) -> Iterator[list[ServeProcess]]:
    started = [ServeProcess(f"i{n}", env) for n in range(3)]
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture
async def api(nc: Client) -> CronClient:
    return CronClient(nc, timeout=5)


@pytest.fixture
async def recorder(nc: Client, bucket: str) -> AsyncIterator[FireRecorder]:
    rec = FireRecorder()
    await rec.subscribe(nc, f"{bucket}.>")
    yield rec


async def ready(procs: list[ServeProcess], api: CronClient) -> ServeProcess:
    """Wait until every process runs and one leads; return the leader."""
    await asyncio.gather(*(p.await_log("nats-cron instance started") for p in procs))
    deadline = time.monotonic() + 10
    while True:
        status = await api.status()
        if status["leader"] is not None:
            break
        assert time.monotonic() < deadline, "no leader elected"
        await asyncio.sleep(0.05)
    leader = next(p for p in procs if p.instance_id == status["leader"]["instance_id"])
    await leader.await_log("won the lease")  # its log pipe may trail the lease it wrote
    return leader


def job(subject: str, every: str = "1s", **extra: object) -> dict[str, object]:
    return {"target": {"subject": subject}, "schedule": {"every": every}, **extra}


async def test_one_leader_fires_with_headers(procs, api, recorder, bucket):
    leader = await ready(procs, api)
    assert sum(p.count("won the lease") for p in procs) == 1
    subject = f"{bucket}.tick"
    assert (await api.create(job(subject)))["status"] == "created"
    await recorder.wait(lambda fires: len(fires) >= 2)
    fire = recorder.fires[0]
    assert fire.instance == leader.instance_id
    assert fire.msg_id == f"{subject}:{int(fire.scheduled.timestamp() * 1000)}"
    assert len(fire.data) == 26  # a ULID when there is no payload
    status = await api.status()
    assert status["is_leader"] in (True, False)
    assert status["leader"]["epoch"] == fire.epoch
    got = await api.get(subject)
    assert got["run_count"] >= 1 and got["last_run"] and got["next_run"]
    assert not recorder.duplicates()


async def test_sigkill_failover_catches_up_and_keeps_phase(procs, api, recorder, bucket):
    leader = await ready(procs, api)
    subject = f"{bucket}.tick"
    await api.create(job(subject))
    await recorder.wait(lambda fires: len(fires) >= 2)
    killed_at = time.time()
    leader.signal(signal.SIGKILL)
    old_epoch = recorder.fires[-1].epoch
    await recorder.wait(
        lambda fires: (
            any(f.epoch != old_epoch for f in fires)
            and len([f for f in fires if f.epoch != old_epoch]) >= 2
        ),
        timeout=TTL + 8,
    )
    new = [f for f in recorder.fires if f.epoch != old_epoch]
    assert new[0].instance != leader.instance_id
    failover = new[0].received - killed_at
    print(f"SIGKILL failover to next fire: {failover:.2f}s")
    assert failover < TTL + 2
    # The latest slot missed while nobody led is fired once by the new leader: the first
    # new slot is either the next one on the grid (none missed) or the latest one that
    # had passed when the new leader won.
    won = max(
        datetime.fromisoformat(line["time"]).timestamp()
        for p in procs
        if p is not leader
        for line in p.find("won the lease")
    )
    last_old = max(f.scheduled.timestamp() for f in recorder.fires if f.epoch == old_epoch)
    first_new = new[0].scheduled.timestamp()
    assert first_new == pytest.approx(last_old + 1, abs=0.01) or won - 1.01 < first_new <= won
    # Phase: every slot sits on the same 1 s grid.
    phases = {int(f.scheduled.timestamp() * 1000) % 1000 for f in recorder.fires}
    assert len(phases) == 1
    assert not recorder.duplicates()


async def test_sigterm_hands_over_without_waiting_for_the_ttl(procs, api, recorder, bucket):
    leader = await ready(procs, api)
    leader.signal(signal.SIGTERM)
    assert await leader.wait_exit() == 0
    released = datetime.fromisoformat(leader.find("released the lease")[0]["time"])
    others = [p for p in procs if p is not leader]
    won = await asyncio.wait_for(asyncio.gather(*(_first_win(p) for p in others)), timeout=TTL + 5)
    winners = [w for w in won if w is not None]
    assert len(winners) == 1
    handover = (winners[0] - released).total_seconds()
    print(f"clean handover: {handover * 1000:.1f} ms")
    assert handover < 0.5


async def _first_win(proc: ServeProcess) -> datetime | None:
    try:
        line = await proc.await_log("won the lease", timeout=TTL + 3)
    except TimeoutError:
        return None
    return datetime.fromisoformat(line["time"])


async def test_frozen_leader_never_fires_a_slot_the_new_leader_owns(procs, api, recorder, bucket):
    leader = await ready(procs, api)
    subject = f"{bucket}.tick"
    await api.create(job(subject))
    await recorder.wait(lambda fires: len(fires) >= 1)
    leader.signal(signal.SIGSTOP)
    frozen_epoch = recorder.fires[-1].epoch
    await recorder.wait(
        lambda fires: sum(f.epoch != frozen_epoch for f in fires) >= 2, timeout=TTL + 8
    )
    thawed_at = time.time()
    leader.signal(signal.SIGCONT)
    # Let the thawed process run into its due slots; it must notice it is fenced.
    await leader.await_log("lost the lease", timeout=10)
    count = len(recorder.fires)
    await recorder.wait(lambda fires: len(fires) >= count + 3, timeout=10)
    late = [f for f in recorder.fires if f.epoch == frozen_epoch and f.received > thawed_at]
    assert not late, f"the deposed leader fired after thawing: {late}"
    assert not recorder.duplicates()


async def test_follower_changes_reach_the_leader(procs, api, recorder, bucket, nats_url, env):
    from nats_apscheduler.server import NatsCron
    from nats_apscheduler.settings import Connection, Settings

    await ready(procs, api)
    settings = Settings(
        connection=Connection(url=nats_url),
        instance_id="embedded-follower",
        jobs_bucket=env["NATS_CRON_JOBS_BUCKET"],
        leader_bucket=env["NATS_CRON_LEADER_BUCKET"],
        events_stream=env["NATS_CRON_EVENTS_STREAM"],
        events_prefix=env["NATS_CRON_EVENTS_PREFIX"],
    )
    follower = NatsCron(settings)
    await follower.start()
    try:
        assert not follower.election.is_leader_now()
        subject = f"{bucket}.via-follower"
        await follower.jobs.create(job(subject, payload={"type": "text", "data": "v1"}))
        await recorder.wait(lambda fires: len(recorder.of(subject)) >= 1)
        assert recorder.of(subject)[0].instance != "embedded-follower"
        await follower.jobs.update(job(subject, payload={"type": "text", "data": "v2"}))
        await recorder.wait(lambda fires: any(f.data == b"v2" for f in recorder.of(subject)))
        await follower.jobs.delete(subject)
        deleted_at = time.time()
        # Proof of absence: a sentinel created after the delete fires twice meanwhile.
        sentinel = f"{bucket}.sentinel"
        await follower.jobs.create(job(sentinel))
        await recorder.wait(lambda fires: len(recorder.of(sentinel)) >= 2)
        assert not [f for f in recorder.of(subject) if f.received > deleted_at + 0.1]
    finally:
        await follower.stop()


async def test_bad_input_never_crashes_an_instance(procs, api, bucket):
    await ready(procs, api)
    bad_bodies = [
        b"",
        b"{",
        b"[]",
        b"null",
        b'"x"',
        b"123",
        b'{"subject": 5}',
        b'{"target": {"subject": "a.*"}, "schedule": {"every": "1s"}}',
        b'{"target": {"subject": "x"}, "schedule": {"cron": "TZ=Europe/Berlin"}}',
        b'{"target": {"subject": "x"}, "schedule": {"every": "0s"}}',
        b'{"pattern": ""}',
        '{"subject": "\u00e9\u00e9"}'.encode(),
    ]
    endpoints = [
        "create",
        "update",
        "get",
        "delete",
        "delete.pattern",
        "pause",
        "resume",
        "trigger",
        "history",
    ]
    for endpoint in endpoints:
        for body in bad_bodies:
            msg = await api._nc.request(f"nats-cron.jobs.{endpoint}", body, timeout=5)
            code = (msg.headers or {}).get("Nats-Service-Error-Code")
            assert code is not None and code.startswith("4"), (endpoint, body, msg.data)
            assert b'"error"' in msg.data
    with pytest.raises(ApiError) as err:
        await api.get(f"{bucket}.missing")
    assert err.value.code == 404
    assert all(p.proc.poll() is None for p in procs)
    assert (await api.status())["leader"] is not None


async def test_status_names_the_leader_from_any_instance(procs, api):
    leader = await ready(procs, api)
    seen = set()
    for _ in range(12):
        status = await api.status()
        seen.add(status["instance_id"])
        assert status["leader"]["instance_id"] == leader.instance_id
    assert len(seen) >= 2  # the queue group spreads requests over instances
    discovered = await api.discover("PING")
    assert sorted(d["metadata"]["instance_id"] for d in discovered) == ["i0", "i1", "i2"]


async def test_missed_slots_respect_the_grace_window(nats_url, bucket, recorder, api, env):
    """All instances down across a slot: fired late within grace, skipped past it."""
    from nats_apscheduler.server import NatsCron
    from nats_apscheduler.settings import Connection, Settings

    settings = Settings(
        connection=Connection(url=nats_url),
        instance_id="solo",
        jobs_bucket=env["NATS_CRON_JOBS_BUCKET"],
        leader_bucket=env["NATS_CRON_LEADER_BUCKET"],
        events_stream=env["NATS_CRON_EVENTS_STREAM"],
        events_prefix=env["NATS_CRON_EVENTS_PREFIX"],
    )
    cron = NatsCron(settings)
    await cron.start()
    start = datetime.now(UTC)
    keep, skip = f"{bucket}.keep", f"{bucket}.skip"
    first = start.replace(microsecond=0).timestamp() + 2
    anchor = datetime.fromtimestamp(first, UTC).isoformat()
    await cron.jobs.create(job(keep, schedule={"every": "3s", "start": anchor, "grace": "1h"}))
    await cron.jobs.create(job(skip, schedule={"every": "3s", "start": anchor, "grace": "1s"}))
    await cron.stop()
    # Nobody runs while two slots pass; the clock itself is the event awaited here:
    # restart when the latest missed slot (first + 3) is 1.5 s old.
    await asyncio.sleep(max(0.0, first + 4.5 - time.time()))
    cron = NatsCron(settings)
    await cron.start()
    try:
        await recorder.wait(lambda fires: len(recorder.of(keep)) >= 1, timeout=10)
        caught_up = recorder.of(keep)[0]
        assert caught_up.scheduled.timestamp() == pytest.approx(first + 3, abs=0.01)
        assert caught_up.received - caught_up.scheduled.timestamp() > 1.0
        await recorder.wait(lambda fires: len(recorder.of(skip)) >= 1, timeout=10)
        assert recorder.of(skip)[0].scheduled.timestamp() == pytest.approx(first + 6, abs=0.01)
        assert len(recorder.of(keep)) == len({f.msg_id for f in recorder.of(keep)})
    finally:
        await cron.stop()


async def test_list_pages_when_the_jobs_do_not_fit_in_one_message(nc, nats_url, bucket):
    """More jobs than one message holds: `list` pages by subject, and the client follows."""
    from nats_apscheduler.server import NatsCron
    from nats_apscheduler.settings import Connection, Settings

    settings = Settings(
        connection=Connection(url=nats_url),
        instance_id="pager",
        jobs_bucket=f"{bucket}-jobs",
        leader_bucket=f"{bucket}-leader",
        events_stream=f"H_{bucket}",
        events_prefix=f"ev.{bucket}",
    )
    cron = NatsCron(settings)
    await cron.start()
    try:
        big = "x" * (nc.max_payload // 8)  # eight of these fill a message
        subjects = [f"{bucket}.big.{i:02d}" for i in range(20)]
        for subject in subjects:
            document = job(subject, payload={"type": "text", "data": big})
            document["schedule"] = {"every": "24h"}
            await cron.jobs.create(document)
        api = CronClient(nc, timeout=10)
        first = await api.request("nats-cron.jobs.list")
        assert 0 < len(first["jobs"]) < len(subjects) and first["next"]
        assert [j["target"]["subject"] for j in first["jobs"]] == subjects[: len(first["jobs"])]
        assert first["next"] == first["jobs"][-1]["target"]["subject"]
        everything = await api.list()
        assert [j["target"]["subject"] for j in everything] == subjects
        assert all(j["payload"]["data"] == big for j in everything)
        last = await api.request("nats-cron.jobs.list", {"after": subjects[-2]})
        assert [j["target"]["subject"] for j in last["jobs"]] == subjects[-1:]
        assert last["next"] is None
        with pytest.raises(ApiError) as bad:
            await api.request("nats-cron.jobs.list", {"after": 5})
        assert bad.value.code == 400 and "after" in str(bad.value)
    finally:
        await cron.stop()


async def test_provisioning_waits_for_a_forming_cluster() -> None:
    """A cluster still forming refuses replicated buckets ("no suitable peers", 10005):
    start-up retries that, and only that."""
    import nats.js.errors

    from nats_apscheduler import server

    calls = 0

    async def create() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise nats.js.errors.BadRequestError(
                code=400, err_code=10005, description="no suitable peers for placement"
            )

    await server._provision(create, "a bucket")
    assert calls == 3

    async def refused() -> None:
        raise nats.js.errors.BadRequestError(code=400, err_code=10058, description="name in use")

    with pytest.raises(nats.js.errors.BadRequestError):
        await server._provision(refused, "a bucket")
