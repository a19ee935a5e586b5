"""The HTTP listener of real `nats-cron serve` processes, over plain HTTP: every route of
the JSON API against the NATS API's own answers, the token, the Host and Origin rules,
escaping, GETs that never change anything, the 127.0.0.1 default, the metrics-port alias
and input that must not crash an instance.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

import tests.test_fuzz as fuzz
from nats_apscheduler.client import ApiError, CronClient
from nats_apscheduler.cron import fire_times
from nats_apscheduler.embedded import EmbeddedNatsServer
from nats_apscheduler.spec import parse_job
from tests.helpers.cli_run import service_env
from tests.helpers.cluster import FireRecorder, ServeProcess
from tests.helpers.waiting import eventually
from tests.helpers.web import LISTENING, Http, repo_root, start_serve

TOKEN = "s3cr3t-Tok3n-for-tests"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    srv = EmbeddedNatsServer(tmp_path_factory.mktemp("web-js")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def open_instance(server: EmbeddedNatsServer) -> Iterator[tuple[ServeProcess, int]]:
    """A serve on loopback without a token: changes allowed (from this machine)."""
    proc, port = start_serve("web-open", server.url)
    yield proc, port
    proc.stop()


@pytest.fixture(scope="module")
def token_instance(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServeProcess, int, str]]:
    """A serve with a token, on a NATS server of its own (the NATS API answers from any
    instance on a server): the process, its HTTP port, its server's URL."""
    token_server = EmbeddedNatsServer(tmp_path_factory.mktemp("web-token-js")).start()
    proc, port = start_serve("web-token", token_server.url, NATS_CRON_HTTP_TOKEN=TOKEN)
    yield proc, port, token_server.url
    proc.stop()
    token_server.stop()


@pytest.fixture
async def http(open_instance: tuple[ServeProcess, int]) -> AsyncIterator[Http]:
    async with Http(open_instance[1]) as client:
        yield client


@pytest.fixture
async def nc(server: EmbeddedNatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(server.url)
    yield client
    await client.close()


def job(subject: str, **schedule: Any) -> dict[str, Any]:
    return {"target": {"subject": subject}, "schedule": schedule or {"every": "1h"}}


# --- reads ------------------------------------------------------------------------------


async def test_list_pages_patterns_and_words(http: Http) -> None:
    for subject, schedule in (
        ("list.a.one", {"every": "1h"}),
        ("list.a.two", {"cron": "0 9 * * MON-FRI", "timezone": "Europe/Berlin"}),
        ("list.b.one", {"cron": "*/5 * * * *"}),
    ):
        assert (await http.post("/api/jobs", job(subject, **schedule))).status == 201

    reply = (await http.get("/api/jobs?pattern=list.>")).json()
    assert [j["target"]["subject"] for j in reply["jobs"]] == [
        "list.a.one",
        "list.a.two",
        "list.b.one",
    ]
    assert reply["next"] is None
    assert reply["words"] == {
        "list.a.one": "every hour",
        "list.a.two": "at 09:00, on Monday to Friday (Europe/Berlin)",
        "list.b.one": "every 5 minutes (UTC)",
    }
    first = reply["jobs"][0]
    for key in ("next_run", "last_run", "last_outcome", "run_count", "paused", "revision"):
        assert key in first  # the NATS API's documents, run state included

    wildcard = (await http.get("/api/jobs?pattern=list.*.one")).json()
    assert [j["target"]["subject"] for j in wildcard["jobs"]] == ["list.a.one", "list.b.one"]

    page = (await http.get("/api/jobs?pattern=list.>&limit=2")).json()
    assert [j["target"]["subject"] for j in page["jobs"]] == ["list.a.one", "list.a.two"]
    assert page["next"] == "list.a.two"
    rest = (await http.get(f"/api/jobs?pattern=list.>&limit=2&after={page['next']}")).json()
    assert [j["target"]["subject"] for j in rest["jobs"]] == ["list.b.one"]
    assert rest["next"] is None

    bad = await http.get("/api/jobs?pattern=list.>.x")
    assert (bad.status, bad.json()) == (
        400,
        {"error": "pattern: 'list.>.x': '>' must be the last token"},
    )
    assert (await http.get("/api/jobs?limit=0")).status == 400
    assert (await http.get("/api/jobs?limit=x")).json() == {
        "error": "limit: must be a whole number from 1 to 5000"
    }


async def test_a_job_with_its_next_times_in_utc_and_its_zone_and_its_history(
    http: Http, nc: Client
) -> None:
    cron = {"cron": "30 8 * * MON-FRI", "timezone": "America/New_York"}
    assert (await http.post("/api/jobs", job("show.zoned", **cron))).status == 201
    before = datetime.now(UTC)
    reply = await http.get("/api/jobs/show.zoned")
    assert reply.status == 200
    body = reply.json()
    api_job = await CronClient(nc).get("show.zoned")
    assert body["job"]["schedule"] == api_job["schedule"]
    assert body["job"]["revision"] == api_job["revision"]
    assert reply.headers["ETag"] == f'"{api_job["revision"]}"'
    assert body["words"] == "at 08:30, on Monday to Friday (America/New_York)"
    assert body["timezone"] == "America/New_York"
    expected = fire_times(parse_job(job("show.zoned", **cron)).trigger(before), before, 10)
    assert [t["utc"] for t in body["next"]] == [
        t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        for t in expected
    ]
    zone = ZoneInfo("America/New_York")
    assert [t["local"] for t in body["next"]] == [
        t.astimezone(zone).isoformat(timespec="milliseconds") for t in expected
    ]
    assert all(t["local"].endswith(("-05:00", "-04:00")) for t in body["next"])
    assert body["history"] == []

    # An interval job: its runs show up in its history, newest first, with their outcome.
    recorder = FireRecorder()
    await recorder.subscribe(nc, "show.often")
    await nc.flush()
    assert (await http.post("/api/jobs", job("show.often", every="1s"))).status == 201
    await recorder.wait(lambda fires: len(fires) >= 2, timeout=10)

    async def two_runs() -> Any:
        runs = (await http.get("/api/jobs/show.often?limit=5")).json()["history"]
        return runs if len(runs) >= 2 else None

    runs = await eventually(two_runs, what="two runs in the history")
    assert runs[0]["scheduled"] > runs[1]["scheduled"]
    assert {r["outcome"] for r in runs} == {"fired"}
    # The next times of an interval keep its phase: a whole number of seconds from a fire.
    times = (await http.get("/api/jobs/show.often")).json()["next"]
    phase = datetime.fromisoformat(runs[0]["scheduled"])
    for t in times:
        delta = datetime.fromisoformat(t["utc"]) - phase
        assert delta.total_seconds() == round(delta.total_seconds())
    assert (await http.request("DELETE", "/api/jobs/show.often")).status == 200

    missing = await http.get("/api/jobs/show.nothing")
    assert (missing.status, missing.json()) == (
        404,
        {"error": "no job with subject 'show.nothing'"},
    )
    assert (await http.get("/api/jobs/show.zoned?limit=0")).status == 400


async def test_status_and_instances(http: Http, nc: Client) -> None:
    status = (await http.get("/api/status")).json()
    api_status = await CronClient(nc).status()
    assert set(status) == set(api_status)
    assert status["service"] == "nats-cron"
    assert status["changes_subject"] == api_status["changes_subject"]

    found = (await http.get("/api/instances")).json()
    ids = {i["instance_id"] for i in found["instances"]}
    assert "web-open" in ids  # every instance on the server answers discovery
    mine = next(i for i in found["instances"] if i["instance_id"] == "web-open")
    assert mine["role"] in ("leader", "follower") and "create" in mine["endpoints"]
    figures = found["figures"]
    assert figures["nats_cron_is_leader"] == 1  # its own buckets: it leads them
    assert figures["nats_cron_nats_connected"] == 1
    assert figures["nats_cron_jobs"] == status["jobs"]


async def test_preview_validates_as_create_and_stores_nothing(http: Http, nc: Client) -> None:
    document = job("preview.daily", cron="0 6 * * *", timezone="Asia/Tokyo")
    reply = await http.post("/api/preview?count=3", document)
    assert reply.status == 200
    body = reply.json()
    assert body["valid"] is True and body["words"] == "at 06:00, every day (Asia/Tokyo)"
    assert [t["local"][11:19] for t in body["next"]] == ["06:00:00"] * 3
    assert body["timezone"] == "Asia/Tokyo"
    with pytest.raises(ApiError):
        await CronClient(nc).get("preview.daily")

    for bad in (
        job("preview.x", every="1d"),
        job("preview.x", cron="0 9 * * MONDAY"),
        job("preview.x", every="30s", timezone="Europe/Berlin"),
        job("preview.x", every="100ms"),  # below the instance's minimum interval
        {"target": {"subject": "nats-cron.jobs.list"}, "schedule": {"every": "1h"}},
        {"target": {"subject": "p.x"}, "schedule": {"every": "1h"}, "typo": 1},
    ):
        reply = await http.post("/api/preview", bad)
        assert reply.status == 400
        assert reply.json() == {"error": await nats_error(nc, "create", bad)}


# --- changes: the NATS API's documents and errors -----------------------------------------


async def nats_error(nc: Client, verb: str, body: Any) -> str:
    with pytest.raises(ApiError) as caught:
        await getattr(CronClient(nc), verb)(body)
    return caught.value.message


@pytest.mark.parametrize(
    "document",
    [
        {"target": {"subject": "err.x"}, "schedule": {"every": "1d"}},
        {"target": {"subject": "err.x"}, "schedule": {"cron": "61 * * * *"}},
        {"target": {"subject": "err.x"}, "schedule": {"cron": "0 0 30 2 *"}},
        {"target": {"subject": "err.x"}, "schedule": {"cron": "0 9 * * *", "timezone": "Mars/X"}},
        {"target": {"subject": "err.*"}, "schedule": {"every": "1h"}},
        {"target": {"subject": "$JS.API.x"}, "schedule": {"every": "1h"}},
        {"target": {"subject": "err.x"}, "schedule": {}},
        {
            "target": {"subject": "err.x"},
            "schedule": {"every": "1h"},
            "payload": {"type": "json", "data": "{"},
        },
        {"target": {"subject": "err.x"}, "schedule": {"every": "1h", "nope": 1}},
        [1, 2],
        "text",
    ],
)
async def test_create_errors_are_the_nats_apis(http: Http, nc: Client, document: Any) -> None:
    reply = await http.post("/api/jobs", document)
    assert reply.status == 400
    assert reply.json() == {"error": await nats_error(nc, "create", document)}
    assert re.match(r"^[\w. ]+: ", reply.json()["error"])  # the field, then the rule


async def test_create_replace_delete_with_revisions(http: Http, nc: Client) -> None:
    api = CronClient(nc)
    created = await http.post("/api/jobs", job("crud.one", every="1h"))
    assert created.status == 201
    assert created.json() == {
        "status": "created",
        "subject": "crud.one",
        "revision": (await api.get("crud.one"))["revision"],
    }
    again = await http.post("/api/jobs", job("crud.one", every="1h"))
    assert again.status == 409
    assert again.json() == {"error": await nats_error(nc, "create", job("crud.one"))}

    # PUT replaces; the URL names the subject (the document may leave it out).
    replaced = await http.request("PUT", "/api/jobs/crud.one", {"schedule": {"every": "2h"}})
    assert replaced.status == 200
    assert replaced.json()["created"] is False and replaced.json()["status"] == "updated"
    assert (await api.get("crud.one"))["schedule"] == {"every": "2h"}
    revision = replaced.json()["revision"]
    # A stale revision, in the document or as If-Match, is refused as over NATS.
    stale = await http.request(
        "PUT", "/api/jobs/crud.one", {"schedule": {"every": "3h"}, "revision": revision - 1}
    )
    assert stale.status == 409
    assert stale.json()["error"] == await nats_error(
        nc, "update", {**job("crud.one", every="3h"), "revision": revision - 1}
    )
    match = await http.request(
        "PUT", "/api/jobs/crud.one", {"schedule": {"every": "3h"}}, headers={"If-Match": '"1"'}
    )
    assert match.status == 409
    good = await http.request(
        "PUT",
        "/api/jobs/crud.one",
        {"schedule": {"every": "3h"}},
        headers={"If-Match": f'"{revision}"'},
    )
    assert good.status == 200, good.text
    clash = await http.request(
        "PUT",
        "/api/jobs/crud.one",
        {"schedule": {"every": "3h"}, "revision": 5},
        headers={"If-Match": '"6"'},
    )
    assert clash.status == 400
    other = await http.request("PUT", "/api/jobs/crud.one", job("crud.two"))
    assert other.json() == {
        "error": "target.subject: 'crud.two' is not the subject of this URL ('crud.one')"
    }
    for broken in ({"target": "crud.one", "schedule": {"every": "1h"}}, [1], "x"):
        reply = await http.request("PUT", "/api/jobs/crud.one", broken)
        assert reply.status == 400, (broken, reply.text)
    new = await http.request("PUT", "/api/jobs/crud.new", job("crud.new"))
    assert (new.status, new.json()["created"]) == (201, True)
    # revision 0: only if there is none.
    zero = await http.request("PUT", "/api/jobs/crud.new", {**job("crud.new"), "revision": 0})
    assert zero.status == 409

    deleted = await http.request("DELETE", "/api/jobs/crud.one")
    assert deleted.json() == {"status": "deleted", "subject": "crud.one", "existed": True}
    gone = await http.request("DELETE", "/api/jobs/crud.one")
    assert (gone.status, gone.json()["existed"]) == (200, False)  # idempotent, as over NATS
    with pytest.raises(ApiError):
        await api.get("crud.one")


async def test_pause_resume_trigger_and_dry_runs(http: Http, nc: Client) -> None:
    api = CronClient(nc)
    recorder = FireRecorder()
    await recorder.subscribe(nc, "act.one")
    await nc.flush()
    assert (await http.post("/api/jobs", job("act.one", every="1h"))).status == 201
    revision = (await api.get("act.one"))["revision"]

    # Dry runs (header or query) answer as if done and change nothing.
    for path, headers in (
        ("/api/jobs/act.one/pause?dry_run=true", None),
        ("/api/jobs/act.one/pause", {"Nats-Cron-Dry-Run": "true"}),
    ):
        reply = await http.post(path, headers=headers)
        assert reply.json() == {"status": "paused", "subject": "act.one", "dry_run": True}
    dry_delete = await http.request("DELETE", "/api/jobs/act.one?dry_run=1")
    assert dry_delete.json()["dry_run"] is True
    dry_create = await http.post("/api/jobs?dry_run=true", job("act.dry"))
    assert (dry_create.status, dry_create.json()["dry_run"]) == (200, True)
    assert (await http.post("/api/jobs/act.one/pause?dry_run=maybe")).status == 400
    assert (await api.get("act.one"))["revision"] == revision
    assert not (await api.get("act.one"))["paused"]
    with pytest.raises(ApiError):
        await api.get("act.dry")

    assert (await http.post("/api/jobs/act.one/pause")).json() == {
        "status": "paused",
        "subject": "act.one",
    }
    assert (await api.get("act.one"))["paused"] is True
    refused = await http.post("/api/jobs/act.one/trigger")
    assert refused.status == 409
    assert refused.json()["error"] == await nats_error(nc, "trigger", "act.one")
    forced = await http.post("/api/jobs/act.one/trigger", {"force": True})
    assert forced.status == 200 and forced.json()["status"] == "triggered"
    await recorder.wait(lambda fires: len(fires) == 1, timeout=10)
    assert (await api.get("act.one"))["paused"] is True  # a forced run leaves it paused
    assert (await http.post("/api/jobs/act.one/resume")).json()["status"] == "resumed"
    assert (await api.get("act.one"))["paused"] is False
    assert (await http.post("/api/jobs/act.one/trigger?force=0")).status == 200
    await recorder.wait(lambda fires: len(fires) == 2, timeout=10)
    assert (await http.post("/api/jobs/act.one/trigger", {"force": "yes"})).status == 400
    assert (await http.post("/api/jobs/act.none/pause")).status == 404
    assert (await http.post("/api/jobs/act.one/pause", [1])).status == 400


async def test_subjects_with_a_slash(http: Http, nc: Client) -> None:
    """`/` is allowed in a subject's tokens: sent as is or as %2F, and `/pause` at the end
    of a POST is the action."""
    subject = "slash/pause"
    assert (await http.post("/api/jobs", job(subject))).status == 201
    assert (await http.get("/api/jobs/slash%2Fpause")).json()["job"]["target"]["subject"] == subject
    assert (await http.get("/api/jobs/slash/pause")).status == 200
    assert (await http.post("/api/jobs/slash%2Fpause/pause")).json()["subject"] == subject
    assert (await CronClient(nc).get(subject))["paused"] is True
    assert (await http.post("/api/jobs/slash/pause/resume")).json()["subject"] == subject
    assert (await http.request("DELETE", "/api/jobs/slash%2Fpause")).json()["existed"] is True


async def test_changes_are_logged_with_the_client_address_and_published(
    open_instance: tuple[ServeProcess, int], http: Http, nc: Client
) -> None:
    proc, _ = open_instance
    feed = await CronClient(nc).changes("audit.>")
    try:
        assert (await http.post("/api/jobs", job("audit.one"))).status == 201
        event = await asyncio.wait_for(feed.__aiter__().__anext__(), 5)
    finally:
        await feed.close()
    assert event["change"] == "created" and event["subject"] == "audit.one"
    assert event["requester"] == {"host": "127.0.0.1", "via": "http"}
    # The log line comes through the child's stderr pipe, which may trail the event.
    line = await eventually(
        lambda: next(
            (ln for ln in proc.find("job created") if ln.get("subject") == "audit.one"), None
        ),
        what="a 'job created' log line for audit.one",
    )
    assert line["requester_host"] == "127.0.0.1" and line["requester_via"] == "http"
    assert line["endpoint"] == "create"


# --- safety -------------------------------------------------------------------------------


async def test_a_get_never_changes_anything(http: Http, nc: Client) -> None:
    """Every GET and HEAD, however it is dressed up, leaves jobs as they were: no change
    event precedes the marker change made afterwards."""
    api = CronClient(nc)
    assert (await http.post("/api/jobs", job("safe.one", every="1h"))).status == 201
    before = await api.get("safe.one")
    feed = await api.changes("safe.>")
    try:
        for path in (
            "/api/jobs/safe.one/pause",  # a GET of job "safe.one/pause": 404
            "/api/jobs/safe.one/trigger?force=true",
            "/api/jobs/safe.one?dry_run=false&method=DELETE",
            "/api/jobs?pattern=safe.>&action=delete",
            "/api/jobs/safe.one",
            "/api/status",
            "/api/instances",
            "/api/preview",
            "/",
            "/metrics",
        ):
            for method in ("GET", "HEAD"):
                reply = await http.request(
                    method, path, headers={"X-HTTP-Method-Override": "DELETE"}
                )
                assert reply.status in (200, 404, 405), (method, path, reply.status)
        assert (await http.post("/api/jobs", job("safe.marker"))).status == 201
        event = await asyncio.wait_for(feed.__aiter__().__anext__(), 5)
    finally:
        await feed.close()
    assert event["subject"] == "safe.marker"  # nothing came before it
    after = await api.get("safe.one")
    assert (after["revision"], after["paused"]) == (before["revision"], False)


async def test_pages_and_replies_carry_a_csp_and_the_page_holds_no_job_data(http: Http) -> None:
    payload = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    document = {**job("esc.one"), "payload": {"type": "text", "data": payload}}
    assert (await http.post("/api/jobs", document)).status == 201
    page = await http.get("/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "esc.one" not in page.text and "<script>alert" not in page.text
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", page.text, re.S)
    assert scripts == [""]  # one script, from this origin, nothing inline
    assert 'src="/static/app.js"' in page.text
    for path in ("/", "/static/app.js", "/api/jobs/esc.one", "/api/nope", "/healthz"):
        reply = await http.get(path)
        csp = reply.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
    api_reply = await http.get("/api/jobs/esc.one")
    assert api_reply.headers["Content-Type"].startswith("application/json")
    assert api_reply.json()["job"]["payload"]["data"] == payload  # data, as it was given
    # The script puts job data into the page as text only.
    source = (repo_root() / "nats_apscheduler" / "dashboard" / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in source


async def test_changes_from_another_site_or_name_are_refused(
    open_instance: tuple[ServeProcess, int], http: Http, nc: Client
) -> None:
    port = open_instance[1]
    assert (await http.post("/api/jobs", job("csrf.one"))).status == 201
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": f"http://localhost:{port}"},  # another origin than the page's
        {"Sec-Fetch-Site": "cross-site"},
    ):
        reply = await http.post("/api/jobs/csrf.one/pause", headers=headers)
        assert reply.status == 403, headers
        assert reply.json() == {"error": "a change sent by a page of another site is refused"}
    same = await http.post(
        "/api/jobs/csrf.one/pause",
        headers={"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
    )
    assert same.status == 200
    # A form can only send text: a body must be JSON.
    form = await http.request(
        "POST",
        "/api/jobs",
        data=b'{"target":{"subject":"csrf.two"},"schedule":{"every":"1h"}}',
        headers={"Content-Type": "text/plain"},
    )
    assert form.status == 415
    # DNS rebinding: a name that is not a loopback name reaches nothing, reads included.
    rebound = await http.get("/api/jobs", headers={"Host": f"evil.example:{port}"})
    assert rebound.status == 403
    assert "loopback" in rebound.json()["error"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert (await http.get("/api/status", headers={"Host": host})).status == 200
    # Monitoring may name the listener as it likes: metrics and probes show no job.
    for path in ("/metrics", "/healthz", "/readyz"):
        assert (await http.get(path, headers={"Host": "prometheus.internal"})).status == 200


async def test_monitoring_answers_close_their_connection(
    open_instance: tuple[ServeProcess, int],
) -> None:
    """As the endpoint before the dashboard did: a client reading to the end of the
    stream (a HEALTHCHECK script, a raw scraper) gets its answer and an end."""
    port = open_instance[1]
    for path in ("/metrics", "/healthz", "/readyz"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        body = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert body.startswith(b"HTTP/1.1 200") and b"Connection: close" in body


async def test_the_token(token_instance: tuple[ServeProcess, int, str]) -> None:
    proc, port, url = token_instance
    nc = await nats.connect(url)
    try:
        await refused_without_the_token(proc, port, nc)
    finally:
        await nc.close()


async def refused_without_the_token(proc: ServeProcess, port: int, nc: Client) -> None:
    async with Http(port) as http:
        changes: list[tuple[str, str, Any]] = [
            ("POST", "/api/jobs", job("tok.one")),
            ("PUT", "/api/jobs/tok.one", job("tok.one")),
            ("DELETE", "/api/jobs/tok.one", None),
            ("POST", "/api/jobs/tok.one/pause", None),
            ("POST", "/api/jobs/tok.one/resume", None),
            ("POST", "/api/jobs/tok.one/trigger", None),
            ("POST", "/api/jobs/tok.one/pause?dry_run=true", None),
        ]
        for method, path, body in changes:
            for token, header in (
                (None, None),
                ("wrong", None),
                (TOKEN + "x", None),
                (None, f"Basic {TOKEN}"),
                (None, TOKEN),
            ):
                extra = {"Authorization": header} if header else None
                reply = await http.request(method, path, body, token=token, headers=extra)
                assert reply.status == 401, (method, path, token, header)
                assert reply.headers["WWW-Authenticate"].startswith("Bearer")
                assert "token" in reply.json()["error"]
        with pytest.raises(ApiError):
            await CronClient(nc).get("tok.one")  # nothing was created

        # Reads and the preview need no token.
        assert (await http.get("/api/jobs")).status == 200
        assert (await http.get("/api/status")).status == 200
        assert (await http.post("/api/preview", job("tok.one"))).status == 200
        # With it, every change goes through.
        assert (await http.post("/api/jobs", job("tok.one"), token=TOKEN)).status == 201
        assert (await http.post("/api/jobs/tok.one/pause", token=TOKEN)).status == 200
        lower = await http.post(
            "/api/jobs/tok.one/resume", headers={"Authorization": f"bearer {TOKEN}"}
        )
        assert lower.status == 200
        assert (await http.request("DELETE", "/api/jobs/tok.one", token=TOKEN)).status == 200

    # The token is in no log line, not even the refusals'.
    await proc.await_log("change refused: no valid token")
    assert not any(TOKEN in line for line in proc.raw)
    listening = proc.find(LISTENING)[0]
    assert listening["token"] is True and listening["read_only"] is False


# --- the listener's address ------------------------------------------------------------------


def answers(host: str, port: int) -> bool:
    """Whether something accepts a TCP connection on host:port (loopback addresses only)."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


async def test_loopback_by_default_and_read_only_elsewhere_without_a_token(
    server: EmbeddedNatsServer,
) -> None:
    """127.0.0.2 is loopback too, but only a listener on every address accepts there."""
    proc, port = await asyncio.to_thread(start_serve, "web-default", server.url)
    try:
        assert proc.find(LISTENING)[0]["host"] == "127.0.0.1"
        assert answers("127.0.0.1", port)
        assert not answers("127.0.0.2", port)
    finally:
        proc.stop()

    proc, port = await asyncio.to_thread(
        start_serve, "web-everywhere", server.url, NATS_CRON_HTTP_HOST="0.0.0.0"
    )
    try:
        assert answers("127.0.0.2", port)
        line = proc.find(LISTENING)[0]
        assert (line["host"], line["read_only"]) == ("0.0.0.0", True)
        async with Http(port, host="127.0.0.2") as http:
            assert (await http.get("/api/jobs")).status == 200
            assert (await http.get("/healthz")).text == "ok\n"
            refused = await http.post("/api/jobs", job("ro.one"))
            assert refused.status == 403
            assert "NATS_CRON_HTTP_TOKEN" in refused.json()["error"]
            assert (await http.post("/api/preview", job("ro.one"))).status == 200
    finally:
        proc.stop()


async def test_the_metrics_port_is_the_same_listener(server: EmbeddedNatsServer) -> None:
    env = service_env(server.url, "web-alias", NATS_CRON_METRICS_PORT="0")
    proc = ServeProcess("web-alias", {**env, "NATS_CRON_HTTP_PORT": "", "NATS_CRON_HTTP_HOST": ""})
    try:
        line = await proc.await_log(LISTENING, timeout=20)
        assert line["host"] == "127.0.0.1"
        async with Http(int(line["port"])) as http:
            assert (await http.get("/metrics")).status == 200
            assert (await http.get("/")).status == 200
            assert (await http.get("/api/status")).status == 200
    finally:
        proc.stop()

    both = ServeProcess(
        "web-both",
        {**env, "NATS_CRON_METRICS_PORT": "9101", "NATS_CRON_HTTP_PORT": "9102"},
    )
    try:
        assert await both.wait_exit() == 2
    finally:
        both.stop()
    assert any("differ: one listener serves" in line for line in both.raw)


async def test_bad_input_never_crashes_the_instance(
    open_instance: tuple[ServeProcess, int], http: Http
) -> None:
    proc, port = open_instance
    huge = await http.request(
        "POST",
        "/api/jobs",
        data=b'{"x": "' + b"a" * (5 * 1024 * 1024) + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert huge.status == 413 and "larger than" in huge.json()["error"]
    deep = await http.request(
        "POST",
        "/api/jobs",
        data=b"[" * 100_000 + b"]" * 100_000,
        headers={"Content-Type": "application/json"},
    )
    assert deep.status == 400
    assert (await http.request("POST", "/api/jobs", data=b"\xff\xfe")).status in (400, 415)
    assert (await http.request("PATCH", "/api/jobs/x")).status == 405
    assert (await http.get("/api/jobs/%ff%fe")).status in (400, 404)
    assert (await http.get("/static/../../settings.py")).status in (403, 404)

    def raw(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(data)
            return sock.recv(200)

    status_line = re.compile(rb"^HTTP/1\.[01] (400|403|431) ")
    assert status_line.match(await asyncio.to_thread(raw, b"GARBAGE\r\n\r\n"))
    long_header = b"GET / HTTP/1.1\r\nHost: " + b"x" * 70000 + b"\r\n\r\n"
    assert status_line.match(await asyncio.to_thread(raw, long_header))
    assert proc.proc.poll() is None
    assert (await http.get("/healthz")).status == 200
    assert json.loads((await http.get("/api/status")).text)["service"] == "nats-cron"


# --- fuzzing -----------------------------------------------------------------------------


async def _send_fuzzed(port: int, document: Any, subject: str, route: str) -> None:
    path_subject = urllib.parse.quote(subject, safe="")
    method, path = {
        "create": ("POST", "/api/jobs?dry_run=true"),
        "replace": ("PUT", f"/api/jobs/{path_subject}?dry_run=true"),
        "preview": ("POST", "/api/preview"),
        "trigger": ("POST", f"/api/jobs/{path_subject}/trigger?dry_run=true"),
        "read": ("GET", f"/api/jobs?pattern={path_subject}"),
    }[route]
    async with Http(port) as http:
        reply = await http.request(method, path, None if method == "GET" else document)
    assert reply.status < 500, (route, document, reply.text)
    body = reply.json()
    if reply.status >= 400:
        assert isinstance(body.get("error"), str) and body["error"], body


@settings(
    max_examples=int(os.environ.get("NATS_CRON_WEB_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    document=fuzz.documents,
    subject=fuzz.subjects,
    route=st.sampled_from(["create", "replace", "preview", "trigger", "read"]),
)
def test_fuzzed_requests_get_an_answer_never_a_5xx(
    open_instance: tuple[ServeProcess, int], document: Any, subject: str, route: str
) -> None:
    """The NATS API fuzzer's documents and subjects, over HTTP (dry runs: nothing is
    stored): every answer is JSON, 4xx with an error or a success; the instance lives."""
    asyncio.run(_send_fuzzed(open_instance[1], document, subject, route))
    assert open_instance[0].proc.poll() is None
