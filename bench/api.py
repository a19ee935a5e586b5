"""Benchmark: API latency (create, get, status, list) against request/reply baselines.

    python bench/api.py                   # full: 5 rounds x 200 sequential requests per op
    python bench/api.py --quick           # smoke: 1 round x 50, list with 2,000 jobs
    python bench/api.py --rounds 9 --requests 500 --list-jobs 20000

One `nats-cron serve` process (it leads; fresh buckets). Every request is sequential, from
this process, through `nats_apscheduler.client.CronClient` (JSON encode, request, JSON
decode), on one connection:
- echo (baseline): `CronClient.request` to a plain NATS echo responder (a subscription
  that replies the request's bytes) in another Python process, with a job document as
  the body, so both sides do the same client-side work;
- micro_echo (baseline 2): the same through a `nats.micro` endpoint (the framework the
  service uses) in another process;
- create: a new job (`every 1h`) per request; get: a random existing job; status.
Ops interleave per round (echo, micro_echo, create, get, status, ...). Then `--list-jobs`
jobs (10,000) are stored through the service's JobManager/JetStreamJobStore; once the
instance has loaded them all: `list` (`--list-repeats` times: its first page as one raw
request, and every job through `CronClient.list()`, which follows the pages), and
get/create/status again
at that size. List's baseline: a raw KV watch of the whole jobs bucket from here.
Prints one JSON object: per op p50/p99/max (ms) pooled over the rounds, the medians of
the per-round p50 and p99, the ratios of the p50/p99 to the echo baseline's, and for
list the latency, reply size or error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

# bench/ (its helpers) and the repository (nats_apscheduler, tests.helpers)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # type: ignore[import-not-found]
    PROCS,
    LocalServer,
    WorkerRun,
    connect,
    drop_service_state,
    emit,
    fill_jobs,
    machine,
    med,
    note,
    ratio,
    serve_env,
    spread_docs,
    summary,
)
from nats.aio.client import Client

from nats_apscheduler.client import CronClient
from nats_apscheduler.errors import ApiError
from tests.helpers.cluster import ServeProcess

NAME = "api"


def job_doc(i: int) -> dict[str, Any]:
    return {
        "target": {"subject": f"bench.api.created.{i}"},
        "payload": {"type": "json", "data": json.dumps({"table": "sessions", "i": i})},
        "schedule": {"every": "1h"},
    }


class Ops:
    def __init__(self, api: CronClient) -> None:
        self.api = api
        self.created: list[str] = []
        self.next_id = 0

    async def echo(self) -> None:
        await self.api.request("bench.echo.plain", job_doc(0))

    async def micro_echo(self) -> None:
        await self.api.request("bench.echo.micro", job_doc(0))

    async def create(self) -> None:
        doc = job_doc(self.next_id)
        self.next_id += 1
        await self.api.create(doc)
        self.created.append(doc["target"]["subject"])

    async def get(self) -> None:
        await self.api.get(random.choice(self.created))

    async def status(self) -> None:
        await self.api.status()


async def measure(fn: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def rounds(ops: Ops, names: list[str], n_rounds: int, n: int) -> dict[str, Any]:
    samples: dict[str, list[list[float]]] = {name: [] for name in names}
    for _ in range(n_rounds):
        for name in names:
            fn = getattr(ops, name)
            await measure(fn, min(10, n))  # warm this op up
            samples[name].append(await measure(fn, n))
    result: dict[str, Any] = {}
    for name, rs in samples.items():
        pooled = summary(x for r in rs for x in r)
        per_round = [summary(r) for r in rs]
        result[name] = {
            **pooled,
            "round_median_p50_ms": med(s["p50_ms"] for s in per_round),
            "round_median_p99_ms": med(s["p99_ms"] for s in per_round),
        }
    base = result.get("echo")
    if base:
        for r in result.values():
            r["p50_vs_echo"] = ratio(r["round_median_p50_ms"], base["round_median_p50_ms"])
            r["p99_vs_echo"] = ratio(r["round_median_p99_ms"], base["round_median_p99_ms"])
    return result


async def raw_bucket_read(nc: Client, bucket: str) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    kv = await nc.jetstream().key_value(bucket)
    watcher = await kv.watchall()
    keys = nbytes = 0
    async for entry in watcher:
        if entry is None:
            break
        keys += 1
        nbytes += len(entry.value or b"")
    await watcher.stop()
    return time.perf_counter() - t0, keys, nbytes


async def list_runs(api: CronClient, nc: Client, bucket: str, repeats: int) -> dict[str, Any]:
    times: list[float] = []
    sizes: list[int] = []
    errors: list[str] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            msg = await nc.request("nats-cron.jobs.list", b"", timeout=60)
            elapsed = time.perf_counter() - t0
            headers = msg.headers or {}
            if headers.get("Nats-Service-Error-Code"):
                errors.append(
                    f"{headers.get('Nats-Service-Error-Code')}: {headers.get('Nats-Service-Error')}"
                )
            else:
                json.loads(msg.data)
                sizes.append(len(msg.data))
            times.append(elapsed)
        except Exception as exc:  # timeouts, no responders...
            errors.append(f"{type(exc).__name__}: {exc}")
    full: list[float] = []  # every job, through the pages (CronClient.list)
    count = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            count = len(await api.list())
            full.append(time.perf_counter() - t0)
        except Exception as exc:
            errors.append(f"full list: {type(exc).__name__}: {exc}")
    raw = [await raw_bucket_read(nc, bucket) for _ in range(repeats)]
    return {
        "latency": summary(times),
        "full_list_latency": summary(full),
        "full_list_jobs": count,
        "reply_bytes": max(sizes) if sizes else None,
        "errors": sorted(set(errors)),
        "error_count": len(errors),
        "max_payload": nc.max_payload,
        "baseline_raw_kv_read": {
            **summary(r[0] for r in raw),
            "keys": raw[0][1],
            "bytes": raw[0][2],
        },
    }


async def main(args: argparse.Namespace) -> None:
    server = LocalServer().start()
    nc = await connect(server.url)
    api = CronClient(nc, timeout=60)
    env = serve_env(server.url, NAME)
    report: dict[str, Any] = {
        "benchmark": "api",
        "config": {
            "rounds": args.rounds,
            "requests_per_round": args.requests,
            "list_jobs": args.list_jobs,
            "quick": args.quick,
        },
        "machine": machine(),
    }
    echoes = [
        WorkerRun({"role": "echo", "url": server.url, "subject": "bench.echo.plain"}),
        WorkerRun(
            {"role": "echo", "url": server.url, "subject": "bench.echo.micro", "micro": True}
        ),
    ]
    proc = PROCS.add(ServeProcess(f"{NAME}-1", env))
    try:
        for echo in echoes:
            await echo.start()
            await echo.next_line(timeout=30)
        await proc.await_log("leading: firing", timeout=60)
        ops = Ops(api)
        await ops.create()
        names = ["echo", "micro_echo", "create", "get", "status"]
        note("requests with few jobs")
        report["few_jobs"] = await rounds(ops, names, args.rounds, args.requests)
        report["few_jobs"]["jobs"] = (await api.status())["jobs"]

        note(f"storing {args.list_jobs} jobs")
        docs = spread_docs("bench.api.listed", args.list_jobs, every_s=3600)
        fill_s = await fill_jobs(nc, env["NATS_CRON_JOBS_BUCKET"], docs)
        want = len(ops.created) + args.list_jobs
        t0 = time.perf_counter()
        while (await api.status())["jobs"] < want:
            await asyncio.sleep(0.05)
        report["list"] = {
            "jobs": want,
            "fill_s": round(fill_s, 2),
            "instance_caught_up_s": round(time.perf_counter() - t0, 2),
            **await list_runs(api, nc, env["NATS_CRON_JOBS_BUCKET"], args.list_repeats),
        }
        note(f"requests with {want} jobs")
        report["many_jobs"] = await rounds(ops, names, max(1, args.rounds // 2), args.requests)
        report["many_jobs"]["jobs"] = (await api.status())["jobs"]
        errors = [ln for ln in proc.lines if ln.get("level") == "error"]
        report["service_errors_logged"] = len(errors)
        if errors:
            report["first_service_error"] = {k: errors[0].get(k) for k in ("msg", "error")}
    except ApiError as exc:
        report["error"] = f"ApiError {exc.code}: {exc.message}"
    finally:
        proc.stop()
        for echo in echoes:
            await echo.close()
        with contextlib.suppress(Exception):
            await drop_service_state(nc, NAME)
        await nc.close()
        server.stop()
    emit(report)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round x 50, list of 2,000")
    parser.add_argument("--rounds", type=int, help="rounds of every op (5)")
    parser.add_argument("--requests", type=int, help="sequential requests per op per round")
    parser.add_argument("--list-jobs", type=int, help="jobs stored before `list` (10000)")
    parser.add_argument("--list-repeats", type=int, help="list requests (5)")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.requests = args.requests or (50 if args.quick else 200)
    args.list_jobs = args.list_jobs or (2000 if args.quick else 10000)
    args.list_repeats = args.list_repeats or (2 if args.quick else 5)
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
