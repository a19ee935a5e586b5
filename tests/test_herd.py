"""A herd of jobs on one slot, against a real `nats-cron serve` and a follower: every job fires
once, the leader keeps its lease and its loop keeps moving (SPEC §9)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from nats_apscheduler.client import CronClient
from tests.helpers.cluster import ServeProcess

N = 20_000
EVERY = 10  # seconds: `*/10 * * * * *`


@pytest.fixture
def env(nats_url: str, bucket: str) -> dict[str, str]:
    return {
        "NATS_URL": nats_url,
        "NATS_CRON_JOBS_BUCKET": f"{bucket}-jobs",
        "NATS_CRON_LEADER_BUCKET": f"{bucket}-leader",
        "NATS_CRON_EVENTS_STREAM": f"H{bucket}".replace("-", "_"),
        "NATS_CRON_EVENTS_PREFIX": f"ev.{bucket}",
        "NATS_CRON_LEASE_TTL": "2s",
        "NATS_CRON_METRICS_PORT": "0",
        "LOG_LEVEL": "info",
    }


@pytest.fixture
def leader(env: dict[str, str]) -> Iterator[ServeProcess]:
    proc = ServeProcess("herd-leader", env)
    yield proc
    proc.stop()


async def metrics(proc: ServeProcess) -> str:
    line = await proc.await_log("metrics and health on")
    port = int(re.search(r":(\d+)/metrics", line["msg"]).group(1))  # type: ignore[union-attr]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = (await asyncio.wait_for(reader.read(), 10)).decode()
    writer.close()
    return body


@pytest.mark.timeout(180)
async def test_a_herd_on_one_slot_fires_once_each_and_keeps_the_lease(
    leader: ServeProcess, nc: Client, bucket: str
) -> None:
    await leader.await_log("leading: firing", timeout=30)
    api = CronClient(nc, timeout=10)
    documents = [
        {"target": {"subject": f"{bucket}.h.{i}"}, "schedule": {"cron": f"*/{EVERY} * * * * *"}}
        for i in range(N)
    ]
    for at in range(0, N, 2000):  # the batched endpoint `nats-cron apply` uses
        reply = await api.request(
            "nats-cron.jobs.apply", {"jobs": documents[at : at + 2000], "delete": []}
        )
        assert {r["action"] for r in reply["results"]} == {"created"}
    while (await api.status())["jobs"] < N:
        await asyncio.sleep(0.1)
    # The first slot at least 2 s away, so that the whole herd is due at once.
    now = time.time()
    slot = (int(now) // EVERY + 1) * EVERY
    if slot - now < 2:
        slot += EVERY
    scheduled = datetime.fromtimestamp(slot, UTC).isoformat(timespec="milliseconds")
    scheduled = scheduled.replace("+00:00", "Z")
    seen: dict[str, int] = {}
    arrivals: list[float] = []
    done = asyncio.Event()
    api_latency: list[float] = []

    async def on_fire(msg: Msg) -> None:
        if (msg.headers or {}).get("Nats-Cron-Scheduled") == scheduled:
            arrivals.append(time.time())
            seen[msg.subject] = seen.get(msg.subject, 0) + 1
            if len(seen) == N:
                done.set()

    sub = await nc.subscribe(f"{bucket}.h.>", cb=on_fire, pending_msgs_limit=4 * N)
    await nc.flush()

    async def probe() -> None:  # the API keeps answering while the herd is worked through
        while not done.is_set():
            began = time.monotonic()
            await api.status()
            api_latency.append(time.monotonic() - began)
            await asyncio.sleep(0.05)

    await asyncio.sleep(max(0.0, slot - time.time() - 0.5))
    prober = asyncio.ensure_future(probe())
    await asyncio.wait_for(done.wait(), 60)
    await prober
    await sub.unsubscribe()
    assert len(seen) == N and set(seen.values()) == {1}  # every job once
    # Fires leave slice by slice while the rest of the herd is worked through (one write
    # at the end would make the first arrive with the last).
    first, last = min(arrivals) - slot, max(arrivals) - slot
    assert first < last / 2, f"first fire {first:.3f} s, last {last:.3f} s after the slot"
    assert leader.count("lost the lease") == 0
    assert not leader.find("fenced")
    # The loop yielded between slices: no stall near the lease's deadline (TTL 2 s minus
    # its 0.5 s margin), and the API answered throughout.
    body = await metrics(leader)
    stall = float(re.search(r"^nats_cron_loop_lag_max_seconds (\S+)$", body, re.M).group(1))  # type: ignore[union-attr]
    assert stall < 0.75, f"the loop stalled {stall:.3f} s"
    assert max(api_latency) < 1.0, f"the API took {max(api_latency):.3f} s during the herd"
