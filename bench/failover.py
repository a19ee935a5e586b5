"""Benchmark: SIGKILL failover, clean (SIGTERM) handover and cold start, real processes.

    python bench/failover.py [--runs 5]

Prints one JSON object: per measure the samples (seconds) and their median. Every run
uses its own buckets on one local nats-server; nothing else is measured in between.
- failover: SIGKILL of the leader -> first fire published by the new leader
  (a job `every 1s`, so the new leader's first act is to fire the missed slot). The
  kill comes at a random moment, so the time since the last lease refresh is uniform.
- handover: SIGTERM of the leader -> the new leader's "won the lease" log line (both
  timestamps from this machine's clock); its next fire then follows the schedule.
- cold_start: spawning `nats-cron serve` (one instance, one due job in KV) -> its first fire.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nats_apscheduler.client import CronClient
from nats_apscheduler.embedded import EmbeddedNatsServer
from tests.helpers.cluster import FireRecorder, ServeProcess


def env_for(url: str, name: str) -> dict[str, str]:
    return {
        "NATS_URL": url,
        "NATS_CRON_JOBS_BUCKET": f"{name}-jobs",
        "NATS_CRON_LEADER_BUCKET": f"{name}-leader",
        "NATS_CRON_EVENTS_STREAM": f"H_{name}",
        "NATS_CRON_EVENTS_PREFIX": f"ev.{name}",
        "LOG_LEVEL": "info",
    }


async def leader_of(api: CronClient, procs: list[ServeProcess]) -> ServeProcess:
    await asyncio.gather(*(p.await_log("nats-cron instance started") for p in procs))
    while True:
        status = await api.status()
        if status["leader"]:
            return next(p for p in procs if p.instance_id == status["leader"]["instance_id"])
        await asyncio.sleep(0.02)


async def takeover(url: str, name: str, sig: int) -> float:
    nc = await nats.connect(url)
    api = CronClient(nc)
    recorder = FireRecorder()
    await recorder.subscribe(nc, f"{name}.>")
    procs = [ServeProcess(f"{name}-{i}", env_for(url, name)) for i in range(3)]
    try:
        leader = await leader_of(api, procs)
        await api.create({"target": {"subject": f"{name}.tick"}, "schedule": {"every": "1s"}})
        await recorder.wait(lambda fires: len(fires) >= 2)
        epoch = recorder.fires[-1].epoch
        await asyncio.sleep(random.uniform(0, 1))  # decorrelate from lease refreshes
        at = time.time()
        leader.signal(sig)
        if sig == signal.SIGTERM:
            others = [p for p in procs if p is not leader]
            wins = await asyncio.gather(
                *(p.await_log("won the lease", timeout=5) for p in others), return_exceptions=True
            )
            won = min(
                datetime.fromisoformat(w["time"]).timestamp() for w in wins if isinstance(w, dict)
            )
            return won - at
        await recorder.wait(lambda fires: any(f.epoch != epoch for f in fires), timeout=15)
        first = next(f for f in recorder.fires if f.epoch != epoch)
        return first.received - at
    finally:
        for proc in procs:
            proc.stop()
        await nc.close()


async def cold_start(url: str, name: str) -> float:
    nc = await nats.connect(url)
    api = CronClient(nc)
    recorder = FireRecorder()
    await recorder.subscribe(nc, f"{name}.>")
    env = env_for(url, name)
    seed = ServeProcess(f"{name}-seed", env)
    try:
        await seed.await_log("nats-cron instance started")
        await api.create({"target": {"subject": f"{name}.tick"}, "schedule": {"every": "1s"}})
        await recorder.wait(lambda fires: len(fires) >= 1)
    finally:
        seed.stop()
    # The job's next slot passes while nothing runs; the cold instance fires it at once.
    await asyncio.sleep(1.2)
    count = len(recorder.fires)
    at = time.time()
    cold = ServeProcess(f"{name}-cold", env)
    try:
        await recorder.wait(lambda fires: len(fires) > count, timeout=15)
        return recorder.fires[count].received - at
    finally:
        cold.stop()
        await nc.close()


async def main(runs: int) -> None:
    server = EmbeddedNatsServer(Path(tempfile.mkdtemp(prefix="bench-js-"))).start()
    results: dict[str, list[float]] = {"failover": [], "handover": [], "cold_start": []}
    try:
        for i in range(runs):
            results["failover"].append(await takeover(server.url, f"fo{i}", signal.SIGKILL))
            results["handover"].append(await takeover(server.url, f"ho{i}", signal.SIGTERM))
            results["cold_start"].append(await cold_start(server.url, f"cs{i}"))
    finally:
        server.stop()
    report = {
        name: {"median_s": round(statistics.median(xs), 3), "samples_s": [round(x, 3) for x in xs]}
        for name, xs in results.items()
    }
    report["lease_ttl_s"] = 2
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args().runs))
