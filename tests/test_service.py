"""The API of a real `nats-cron serve` process, through `CronClient` (issue 13): revisions
and the update precondition, dry runs, deletes that say whether they deleted, history
purged with its job, server-side pattern lists, forced triggers of paused jobs, change
events, the audit log with the requester's identity, the batched `apply`, and bodies that
break the JSON decoder.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from nats_apscheduler.client import CronClient, Feed
from nats_apscheduler.embedded import EmbeddedNatsServer
from nats_apscheduler.errors import ApiError
from tests.helpers.cli_run import service_env
from tests.helpers.cluster import FireRecorder, ServeProcess

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    srv = EmbeddedNatsServer(tmp_path_factory.mktemp("service-js")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def service(server: EmbeddedNatsServer) -> Iterator[ServeProcess]:
    proc = ServeProcess("svc-a", service_env(server.url, "svc"))
    try:
        proc.wait_for("won the lease", timeout=15)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def nc(server: EmbeddedNatsServer, service: ServeProcess) -> AsyncIterator[Client]:
    """A connection to this module's server (the API subjects are not per bucket)."""
    client = await nats.connect(server.url)
    yield client
    await client.close()


@pytest.fixture
def api(nc: Client) -> CronClient:
    return CronClient(nc, timeout=5)


@pytest.fixture
def prefix() -> str:
    return f"svct{next(_prefixes)}"


def job(subject: str, every: str = "1h", **extra: Any) -> dict[str, Any]:
    return {"target": {"subject": subject}, "schedule": {"every": every}, **extra}


async def code_of(call: Any) -> int:
    with pytest.raises(ApiError) as caught:
        await call
    return caught.value.code


async def next_event(feed: Feed, timeout: float = 5.0) -> dict[str, Any]:
    return await asyncio.wait_for(feed.__aiter__().__anext__(), timeout)


async def no_event(feed: Feed, within: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        event = await next_event(feed, within)
        raise AssertionError(f"unexpected event {event}")


# --- revisions and the update precondition ---------------------------------------------------


async def test_revision_in_replies_and_the_update_precondition(api: CronClient, prefix: str):
    subject = f"{prefix}.report"
    created = await api.create(job(subject, payload={"type": "text", "data": "keep me"}))
    assert created["status"] == "created"  # the Go reply shape, with more fields
    first = await api.get(subject)
    assert first["revision"] == created["revision"] > 0
    listed = {j["target"]["subject"]: j for j in await api.list(f"{prefix}.>")}
    assert listed[subject]["revision"] == first["revision"]

    # a stale revision is a conflict and changes nothing
    stale = api.update(job(subject, "2h"), revision=first["revision"] - 1)
    assert await code_of(stale) == 409
    assert (await api.get(subject))["schedule"] == {"every": "1h"}
    # revision 0: only if there is no such job
    assert await code_of(api.update(job(subject, "2h"), revision=0)) == 409
    assert await code_of(api.update(job(f"{prefix}.gone", "2h"), revision=5)) == 404

    # the right revision: changed, and the revision moves on
    reply = await api.update(job(subject, "2h"), revision=first["revision"])
    assert reply["status"] == "updated" and reply["created"] is False
    assert reply["revision"] > first["revision"]
    assert (await api.get(subject))["revision"] == reply["revision"]

    # A document read back and sent again carries its revision: checked too.
    read_back = await api.get(subject)
    read_back["schedule"] = {"every": "3h"}
    assert (await api.update(read_back))["status"] == "updated"
    assert await code_of(api.update(read_back)) == 409  # it changed since it was read
    # Without a revision (the Go clients) an update is an upsert, as before.
    assert (await api.update(job(f"{prefix}.upserted")))["created"] is True
    assert (await api.update(job(f"{prefix}.upserted", "2h")))["created"] is False


@pytest.mark.parametrize("revision", [-1, "3", 1.5, True])
async def test_a_bad_revision_is_a_400(api: CronClient, prefix: str, revision: Any):
    body = {**job(f"{prefix}.x"), "revision": revision}
    assert await code_of(api.request("nats-cron.jobs.update", body)) == 400


# --- dry runs --------------------------------------------------------------------------------


async def test_dry_run_validates_and_stores_nothing(api: CronClient, prefix: str):
    subject = f"{prefix}.dry"
    feed = await api.changes(f"{prefix}.>")
    try:
        reply = await api.create(job(subject), dry_run=True)
        assert reply == {"status": "created", "subject": subject, "dry_run": True}
        assert await code_of(api.get(subject)) == 404
        assert await code_of(api.create(job(subject, "1d"), dry_run=True)) == 400
        assert await code_of(api.update(job(subject, "30s", payload={"type": "json",
                                        "data": "{"}), dry_run=True)) == 400  # fmt: skip

        await api.create(job(subject, payload={"type": "text", "data": "x"}))
        await next_event(feed)  # the real create
        before = await api.get(subject)
        assert (await api.update(job(subject, "5m"), dry_run=True))["created"] is False
        assert (await api.pause(subject, dry_run=True))["dry_run"] is True
        assert (await api.trigger(subject, dry_run=True))["dry_run"] is True
        assert (await api.delete(subject, dry_run=True))["existed"] is True
        pattern = await api.delete_pattern(f"{prefix}.>", dry_run=True)
        assert pattern == {"count": 1, "deleted": [subject], "dry_run": True}
        results = (await api.request("nats-cron.jobs.apply", {"jobs": [job(subject, "9m")]},
                                     dry_run=True))["results"]  # fmt: skip
        assert results == [{"subject": subject, "action": "changed"}]
        after = await api.get(subject)
        assert after == before, "a dry run changed the job"
        assert (await api.history(subject))["runs"] == []
        await no_event(feed)
        # the checks still apply
        assert await code_of(api.pause(f"{prefix}.missing", dry_run=True)) == 404
        assert await code_of(api.update(job(subject, "5m"), revision=1, dry_run=True)) == 409
    finally:
        await feed.close()


async def test_a_bad_dry_run_header_is_a_400(api: CronClient, nc: Client, prefix: str):
    nc_api = CronClient(nc)
    msg = await nc.request(
        "nats-cron.jobs.create",
        json.dumps(job(f"{prefix}.x")).encode(),
        headers={"Nats-Cron-Dry-Run": "maybe"},
        timeout=5,
    )
    assert msg.headers is not None and msg.headers.get("Nats-Service-Error-Code") == "400"
    assert await code_of(nc_api.get(f"{prefix}.x")) == 404


# --- delete ----------------------------------------------------------------------------------


async def test_delete_says_whether_it_deleted(api: CronClient, prefix: str):
    subject = f"{prefix}.gone"
    await api.create(job(subject))
    reply = await api.delete(subject)
    assert reply["status"] == "deleted" and reply["existed"] is True
    again = await api.delete(subject)  # idempotent, as the Go API
    assert again["status"] == "deleted" and again["existed"] is False


async def test_history_goes_with_its_job(api: CronClient, prefix: str, nc: Client):
    subject = f"{prefix}.beat"
    recorder = FireRecorder()
    await recorder.subscribe(nc, subject)
    await nc.flush()
    await api.create(job(subject))
    await api.trigger(subject)
    await recorder.wait(lambda fires: len(fires) >= 1)
    await wait_for_runs(api, subject, 1)

    await api.delete(subject)
    await api.create(job(subject))
    assert (await api.history(subject))["runs"] == [], "a new job shows the old job's runs"

    # by pattern too
    await api.trigger(subject)
    await wait_for_runs(api, subject, 1)
    assert (await api.delete_pattern(f"{prefix}.>"))["deleted"] == [subject]
    await api.create(job(subject))
    assert (await api.history(subject))["runs"] == []


async def wait_for_runs(api: CronClient, subject: str, count: int) -> list[Any]:
    async def runs() -> list[Any]:
        while True:
            found: list[Any] = (await api.history(subject))["runs"]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.02)  # poll interval

    return await asyncio.wait_for(runs(), 5)


# --- bodies the JSON decoder cannot take -------------------------------------------------------


@pytest.mark.parametrize("depth", [50_000, 200_000])
async def test_deeply_nested_json_is_a_400(nc: Client, depth: int, service: ServeProcess):
    body = b"[" * depth + b"]" * depth
    for subject in ("nats-cron.jobs.create", "nats-cron.jobs.update", "nats-cron.jobs.apply"):
        msg = await nc.request(subject, body, timeout=5)
        assert msg.headers is not None, msg
        assert msg.headers.get("Nats-Service-Error-Code") == "400", msg.headers
        assert "nested too deeply" in json.loads(msg.data)["error"]
    assert service.proc.poll() is None
    assert not service.find("request failed")


# --- list PATTERN ------------------------------------------------------------------------------


async def test_list_filters_by_pattern_on_the_server(api: CronClient, prefix: str, nc: Client):
    for name in ("a.one", "a.two", "a.deep.three", "b.one"):
        await api.create(job(f"{prefix}.{name}"))
    assert [j["target"]["subject"] for j in await api.list(f"{prefix}.a.*")] == [
        f"{prefix}.a.one",
        f"{prefix}.a.two",
    ]
    assert len(await api.list(f"{prefix}.a.>")) == 3
    assert [j["target"]["subject"] for j in await api.list("*.b.one")] == [f"{prefix}.b.one"]
    assert await api.list(f"{prefix}.nothing.>") == []
    # the page of one request holds only matching jobs
    reply = await api.request("nats-cron.jobs.list", {"pattern": f"{prefix}.b.>"})
    assert [j["target"]["subject"] for j in reply["jobs"]] == [f"{prefix}.b.one"]
    for bad in ("a..b", "a.>.b", "a.b*", 7):
        assert await code_of(api.request("nats-cron.jobs.list", {"pattern": bad})) == 400


# --- trigger --force ---------------------------------------------------------------------------


async def test_a_paused_job_is_run_once_by_force_and_stays_paused(
    api: CronClient, prefix: str, nc: Client
):
    subject = f"{prefix}.tick"
    recorder = FireRecorder()
    await recorder.subscribe(nc, subject)
    await nc.flush()
    await api.create(job(subject, "1s", paused=True))
    error = api.trigger(subject)
    assert await code_of(error) == 409
    with pytest.raises(ApiError, match="--force"):
        await api.trigger(subject)

    reply = await api.trigger(subject, force=True)
    assert reply["status"] == "triggered"
    await recorder.wait(lambda fires: len(fires) >= 1)
    state = await api.get(subject)
    assert state["paused"] is True and state["next_run"] is None, state
    # An every-1s job: any slot after the forced run would fire within ~1 s.
    await asyncio.sleep(2.5)  # proving an absence: no event to wait for
    assert len(recorder.of(subject)) == 1, recorder.fires
    assert (await api.get(subject))["run_count"] == 1
    # resuming brings the schedule back
    await api.resume(subject)
    await recorder.wait(lambda fires: len(fires) >= 2)


# --- change events and the audit log -----------------------------------------------------------


async def test_every_change_is_an_event_and_a_log_line(
    api: CronClient, prefix: str, service: ServeProcess
):
    subject = f"{prefix}.audit"
    feed = await api.changes(f"{prefix}.>")
    try:
        await api.create(job(subject))
        await api.update(job(subject, "2h"))
        await api.pause(subject)
        await api.resume(subject)
        await api.trigger(subject)
        await api.delete(subject)
        await api.update(job(f"{prefix}.upsert"))
        changes = [await next_event(feed) for _ in range(7)]
    finally:
        await feed.close()
    assert [(e["change"], e["subject"]) for e in changes] == [
        ("created", subject),
        ("updated", subject),
        ("paused", subject),
        ("resumed", subject),
        ("triggered", subject),
        ("deleted", subject),
        ("created", f"{prefix}.upsert"),
    ]
    assert changes[1]["job"]["schedule"] == {"every": "2h"}
    assert changes[2]["job"]["paused"] is True
    assert changes[5]["job"] is None
    assert all(e["instance"] == "svc-a" and e["requester"] is None for e in changes)
    revisions = [e["revision"] for e in changes[:6]]
    assert revisions == sorted(revisions) and revisions[0] > 0

    for change in ("created", "updated", "paused", "resumed", "triggered", "deleted"):
        line = await service.await_log(f"job {change}", timeout=5)
        assert line["level"] == "info"
    logged = [
        (line["msg"], line["subject"])
        for line in service.lines
        if str(line.get("msg", "")).startswith("job ") and line.get("subject") == subject
    ]
    assert logged == [
        ("job created", subject),
        ("job updated", subject),
        ("job paused", subject),
        ("job resumed", subject),
        ("job triggered", subject),
        ("job deleted", subject),
    ]


ACCOUNTS = """
accounts {
  CRON {
    jetstream: enabled
    users: [{user: cron, password: cronpw}]
    exports: [{service: "nats-cron.>", response_type: singleton}]
  }
  APP {
    users: [{user: alice, password: alicepw}]
    imports: [{service: {account: CRON, subject: "nats-cron.>"}, share: true}]
  }
}
"""


async def test_the_log_names_the_requester_of_another_account(tmp_path: Path) -> None:
    """The API imported into another account (with `share: true`): the server adds
    Nats-Request-Info, and the change is logged with the requester's account and user."""
    conf = tmp_path / "accounts.conf"
    conf.write_text(ACCOUNTS)
    srv = EmbeddedNatsServer(tmp_path / "js", config_file=conf).start()
    proc = ServeProcess(
        "svc-acc", service_env(srv.url, "acc", NATS_USER="cron", NATS_PASSWORD="cronpw")
    )
    try:
        await proc.await_log("won the lease", timeout=15)
        app = await nats.connect(srv.url, user="alice", password="alicepw", name="billing-app")
        try:
            api = CronClient(app)
            await api.create(job("billing.invoice"))
            await api.pause("billing.invoice")
        finally:
            await app.close()
        created = await proc.await_log("job created", timeout=5)
        assert created["subject"] == "billing.invoice"
        assert created["requester_account"] == "APP"
        assert created["requester_user"] == "alice"
        assert created["requester_name"] == "billing-app"
        paused = await proc.await_log("job paused", timeout=5)
        assert paused["requester_user"] == "alice"
    finally:
        proc.stop()
        srv.stop()
    assert "alicepw" not in "".join(proc.raw) and "cronpw" not in "".join(proc.raw)


# --- apply -------------------------------------------------------------------------------------


async def test_apply_batches_are_idempotent(api: CronClient, prefix: str):
    docs = [job(f"{prefix}.n{i:03}", "1h", payload={"type": "text", "data": str(i)})
            for i in range(300)]  # fmt: skip
    first = await api.apply(docs)
    assert [r["action"] for r in first] == ["created"] * 300
    assert [r["subject"] for r in first] == [d["target"]["subject"] for d in docs]
    again = await api.apply(docs)
    assert {r["action"] for r in again} == {"unchanged"}
    revision = (await api.get(f"{prefix}.n000"))["revision"]

    docs[0] = job(f"{prefix}.n000", "2h", payload={"type": "text", "data": "0"})
    bad = {"target": {"subject": f"{prefix}.bad"}, "schedule": {"every": "1d"}}
    mixed = await api.apply([docs[0], bad, docs[1]], [f"{prefix}.n002", f"{prefix}.none"])
    assert [(r["subject"], r["action"]) for r in mixed] == [
        (f"{prefix}.n000", "changed"),
        (f"{prefix}.bad", "invalid"),
        (f"{prefix}.n001", "unchanged"),
        (f"{prefix}.n002", "deleted"),
        (f"{prefix}.none", "absent"),
    ]
    assert 'unknown unit "d"' in mixed[1]["error"]
    assert (await api.get(f"{prefix}.n000"))["revision"] > revision
    assert (await api.get(f"{prefix}.n001"))["schedule"] == {"every": "1h"}
    assert await code_of(api.get(f"{prefix}.n002")) == 404
    twice = await api.apply([docs[3], docs[3]])
    assert [r["action"] for r in twice] == ["unchanged", "invalid"]
