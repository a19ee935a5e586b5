"""/metrics, /healthz and /readyz of real `nats-cron serve` processes, scraped while a job fires.

Two instances share the buckets on the test's own nats-server: the first leads, the second
follows. Then the server stops, and both health endpoints must turn 503 while the processes
keep running (nats-py is reconnecting), and so must the Dockerfile's HEALTHCHECK command.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nats_apscheduler.client import CronClient
from nats_apscheduler.embedded import EmbeddedNatsServer
from tests.helpers.cluster import FireRecorder, ServeProcess
from tests.helpers.waiting import eventually
from tests.test_deploy import healthcheck_command

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; 0 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def scrape(port: int) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    status, text = get(port, "/metrics")
    assert status == 200, f"/metrics answered {status}"
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= lbls)


@pytest.fixture
def env(fresh_server: EmbeddedNatsServer, bucket: str) -> dict[str, str]:
    return {
        "NATS_URL": fresh_server.url,
        "NATS_CRON_JOBS_BUCKET": f"{bucket}-jobs",
        "NATS_CRON_LEADER_BUCKET": f"{bucket}-leader",
        "NATS_CRON_EVENTS_STREAM": f"H{bucket}".replace("-", "_"),
        "NATS_CRON_EVENTS_PREFIX": f"ev.{bucket}",
        "NATS_CRON_LEASE_TTL": "2s",
        "NATS_CRON_METRICS_HOST": "127.0.0.1",
        "LOG_LEVEL": "info",
    }


@pytest.fixture
def started() -> Iterator[list[ServeProcess]]:
    procs: list[ServeProcess] = []
    yield procs
    for proc in procs:  # SIGTERM all first: with NATS gone each may take a while
        proc.signal(15)
    for proc in procs:
        proc.stop()


async def test_metrics_and_health_while_jobs_fire(env, started, fresh_server, bucket):
    leader_port, follower_port = free_port(), free_port()
    leader = ServeProcess("obs-leader", {**env, "NATS_CRON_METRICS_PORT": str(leader_port)})
    started.append(leader)
    await leader.await_log("nats-cron instance started")
    await eventually(
        lambda: value(scrape(leader_port), "nats_cron_is_leader") == 1,
        10,
        "the first leads",
        in_thread=True,
        step=0.1,
    )
    follower = ServeProcess("obs-follower", {**env, "NATS_CRON_METRICS_PORT": str(follower_port)})
    started.append(follower)
    await follower.await_log("nats-cron instance started")

    for port in (leader_port, follower_port):
        assert get(port, "/healthz") == (200, "ok\n")
        assert get(port, "/readyz") == (200, "ready\n")
        assert get(port, "/nope")[0] == 404

    subject = f"{bucket}.observed"
    nc = await nats.connect(fresh_server.url)
    try:
        recorder = FireRecorder()
        await recorder.subscribe(nc, subject)
        api = CronClient(nc, timeout=5)
        await api.create({"target": {"subject": subject}, "schedule": {"every": "1s"}})
        await recorder.wait(lambda fires: len(fires) >= 2, timeout=10)
        first = scrape(leader_port)
        await recorder.wait(lambda fires: len(fires) >= 4, timeout=10)
        second = scrape(leader_port)
    finally:
        await nc.close()

    fired = "nats_cron_fires_total"
    assert value(first, fired, subject=subject, outcome="fired") >= 1
    assert value(first, fired, subject=subject, outcome="fired") < value(
        second, fired, subject=subject, outcome="fired"
    )
    assert value(second, fired, outcome="error") == 0
    lateness = "nats_cron_fire_lateness_seconds_count"
    assert 1 <= value(first, lateness) < value(second, lateness)
    # Every observation falls in some bucket: the +Inf bucket equals the count.
    assert value(second, "nats_cron_fire_lateness_seconds_bucket", le="+Inf") == value(
        second, lateness
    )
    assert value(second, "nats_cron_is_leader") == 1
    assert value(second, "nats_cron_jobs") == 1
    assert value(second, "nats_cron_nats_connected") == 1
    assert value(second, "nats_cron_leader_changes_total") >= 1

    # The follower: not leading, nothing fired, but its store sees the job through KV.
    await eventually(
        lambda: value(scrape(follower_port), "nats_cron_jobs") == 1,
        5,
        "the follower sees it",
        in_thread=True,
        step=0.1,
    )
    follower_samples = scrape(follower_port)
    assert value(follower_samples, "nats_cron_is_leader") == 0
    assert value(follower_samples, fired) == 0

    # The create request reached one of the two (queue group): counted there, code 200.
    creates = sum(
        value(scrape(port), "nats_cron_api_requests_total", endpoint="create", code="200")
        for port in (leader_port, follower_port)
    )
    assert creates == 1

    # NATS goes away: both instances keep running, and both probes turn 503.
    fresh_server.stop()
    stopped = time.monotonic()
    for port in (leader_port, follower_port):
        for path in ("/healthz", "/readyz"):
            await eventually(
                lambda port=port, path=path: get(port, path)[0] == 503,
                10,
                f"{port} {path} 503",
                in_thread=True,
                step=0.1,
            )
    print(f"health turned 503 {time.monotonic() - stopped:.2f}s after the server stopped")
    assert leader.proc.poll() is None and follower.proc.poll() is None
    assert value(scrape(leader_port), "nats_cron_nats_connected") == 0  # still scraped

    # The image's HEALTHCHECK command fails too (test_deploy sees it pass on live instances).
    check = healthcheck_command()
    unhealthy = await asyncio.to_thread(
        subprocess.run,
        check,
        env={**os.environ, "NATS_CRON_METRICS_PORT": str(leader_port)},
        capture_output=True,
        timeout=20,
    )
    assert unhealthy.returncode != 0, unhealthy
    assert b"503" in unhealthy.stderr


def _metrics(per_subject: bool) -> Any:
    from nats_apscheduler.observe import Metrics, State

    state = State(
        is_leader=lambda: True,
        jobs=lambda: 2,
        leader_changes=lambda: 1,
        refresh_failures=lambda: 0,
        connected=lambda: True,
        ready=lambda: True,
        in_flight=lambda: 3,
        in_flight_limit=lambda: 10,
    )
    return Metrics(state, per_subject=per_subject)


def _samples(metrics: Any) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }


@pytest.mark.parametrize("per_subject", [True, False])
def test_outcomes_last_success_and_the_opt_out_of_per_subject_series(per_subject: bool) -> None:
    """Fires are counted by outcome with each job's last success; without per-subject series
    (many jobs) the same counts come without the `subject` label and no per-job gauge."""
    metrics = _metrics(per_subject)
    metrics.on_fire("a.pub", "fired", 0.002, False, at=1000.0)
    metrics.on_sent("b.req", 0.003, True)
    metrics.on_outcome("b.req", "failed", 1001.0)
    metrics.on_outcome("b.req", "succeeded", 1002.0)
    metrics.on_outcome("c.req", "skipped", 1003.0)
    metrics.on_dead_letter("c.req")
    samples = _samples(metrics)

    def get(name: str, job: str | None = None, **labels: str) -> float | None:
        if job is not None and per_subject:
            labels["subject"] = job
        return samples.get((name, frozenset(labels.items())))

    assert get("nats_cron_fires_total", "a.pub", outcome="fired") == 1
    assert get("nats_cron_fires_total", "b.req", outcome="failed") == 1
    assert get("nats_cron_fires_total", "b.req", outcome="succeeded") == 1
    assert get("nats_cron_fires_total", "c.req", outcome="skipped") == 1
    assert get("nats_cron_caught_up_slots_total", "b.req") == 1
    assert get("nats_cron_dead_letters_total", "c.req") == 1
    assert get("nats_cron_fire_lateness_seconds_count") == 2  # the fire and the request
    assert get("nats_cron_runs_in_flight") == 3 and get("nats_cron_runs_in_flight_limit") == 10
    gauge = "nats_cron_last_success_timestamp_seconds"
    if not per_subject:
        assert not [key for key in samples if key[0] == gauge]
        assert b"subject=" not in metrics.exposition()
        return
    assert get(gauge, "a.pub") == 1000.0 and get(gauge, "b.req") == 1002.0
    metrics.forget("a.pub")  # a deleted job's gauge goes
    assert (gauge, frozenset({("subject", "a.pub")})) not in _samples(metrics)
