"""Profiles (cProfile, in-process, with call counts): where the fire and start-up paths spend.

    python bench/profiling.py fire [--count 2000] [--duration 10]     # NatsCron firing
    python bench/profiling.py startup [--jobs 10000]                   # JetStreamJobStore.open()
    python bench/profiling.py --quick fire                             # small and short
    python bench/profiling.py metrics [--subjects 100000]            # per-subject labels

`fire`: a NatsCron instance (leader, fence, run state, history, metrics) in a child process
fires `count` jobs every 1 s (phases spread); cProfile runs for `duration` s after a warm-up.
Prints the top functions (self and cumulative seconds) and, per fire, how many times the
key operations ran: encodes of the job record, store updates, KV writes, watch entries
(our own writes echoed back included), messages sent and received, socket writes.
`startup`: stores `jobs` jobs (every 1h, phases spread) and cProfiles a fresh child's
`await JetStreamJobStore(...).open()`, next to a raw KV watch of the same bucket (baseline),
and times open() without cProfile, with and without Python's cyclic GC during the load
(the GC's full collections over the growing heap make the load superlinear).
`metrics`: fires of `subjects` distinct jobs through the instance's Prometheus metrics
(labelled by subject): RSS growth, cost per fire, size and time of one /metrics scrape.
cProfile slows Python code down (roughly 1.5-2x), so absolute times here are inflated;
use the shares and the call counts, and the other benchmarks for timings.
For sampling profiles of real `nats-cron serve` processes (py-spy), see
`fire_ceiling.py --profile DIR` and `startup.py --profile DIR`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

# bench/ (its helpers) and the repository (nats_apscheduler, tests.helpers)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # type: ignore[import-not-found]
    LocalServer,
    WorkerRun,
    connect,
    emit,
    fill_jobs,
    machine,
    note,
    spread_docs,
)


async def fire(args: argparse.Namespace) -> dict[str, Any]:
    server = LocalServer().start()
    try:
        run = WorkerRun(
            {
                "role": "cron",
                "url": server.url,
                "name": "prof",
                "count": args.count,
                "duration": args.duration,
                "warmup": args.warmup,
            }
        )
        await run.start()
        try:
            result = await run.wait(timeout=args.duration + args.warmup + 300)
        finally:
            await run.close()
    finally:
        server.stop()
    result.pop("event", None)
    return {"benchmark": "profile.fire", "machine": machine(), **result}


async def startup(args: argparse.Namespace) -> dict[str, Any]:
    server = LocalServer().start()
    try:
        nc = await connect(server.url)
        docs = spread_docs("bench.prof", args.jobs, every_s=3600)
        note(f"storing {args.jobs} jobs")
        fill_s = await fill_jobs(nc, "prof-jobs", docs)
        await nc.close()
        out: dict[str, Any] = {
            "benchmark": "profile.startup",
            "machine": machine(),
            "jobs": args.jobs,
            "fill_s": round(fill_s, 2),
        }
        variants = (
            ("raw_watch", "raw_watch", {}),
            ("store_open", "store_open", {}),
            ("store_open_gc_disabled", "store_open", {"disable_gc": True}),
            ("store_open_cprofile", "store_open", {"cprofile": True}),
        )
        for key, role, extra in variants:
            run = WorkerRun(
                {
                    "role": role,
                    "url": server.url,
                    "bucket": "prof-jobs",
                    "spawned_at": time.time(),
                    **extra,
                }
            )
            await run.start()
            try:
                res = await run.wait(timeout=900)
            finally:
                await run.close()
            res.pop("event", None)
            out[key] = res
    finally:
        server.stop()
    return out


def metrics(args: argparse.Namespace) -> dict[str, Any]:
    """The per-subject label sets of the fire metrics: memory and /metrics scrape cost."""
    from nats_apscheduler.observe import Metrics, State

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    metrics = Metrics(State(*(lambda: 0 for _ in range(6))))
    before = rss_mb()
    t0 = time.perf_counter()
    for i in range(args.subjects):
        metrics.on_fire(f"bench.job.{i}", "fired", 0.001, False)
    first = time.perf_counter() - t0
    grown = rss_mb() - before
    t0 = time.perf_counter()
    for i in range(args.subjects):
        metrics.on_fire(f"bench.job.{i}", "fired", 0.001, False)
    steady = time.perf_counter() - t0
    scrapes = []
    size = 0
    for _ in range(3):
        t0 = time.perf_counter()
        size = len(metrics.exposition())
        scrapes.append(time.perf_counter() - t0)
    return {
        "benchmark": "profile.metrics",
        "machine": machine(),
        "subjects_fired": args.subjects,
        "rss_growth_mb": round(grown, 1),
        "rss_mb_per_1000_subjects": round(grown / (args.subjects / 1000), 3),
        "on_fire_us_first": round(first / args.subjects * 1e6, 2),
        "on_fire_us_steady": round(steady / args.subjects * 1e6, 2),
        "metrics_bytes": size,
        "scrape_s_median": round(sorted(scrapes)[1], 3),
        "note": "a scrape runs on the instance's event loop (observe.HttpEndpoint)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and short")
    sub = parser.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fire", help="cProfile a NatsCron instance while it fires")
    f.add_argument("--count", type=int)
    f.add_argument("--duration", type=float)
    f.add_argument("--warmup", type=float, default=3.0)
    s = sub.add_parser("startup", help="cProfile JetStreamJobStore.open() on a full bucket")
    s.add_argument("--jobs", type=int)
    m = sub.add_parser("metrics", help="cost of per-subject metric labels (in this process)")
    m.add_argument("--subjects", type=int)
    args = parser.parse_args()
    if args.what == "fire":
        args.count = args.count or (500 if args.quick else 2000)
        args.duration = args.duration or (4 if args.quick else 10)
        emit(asyncio.run(fire(args)))
    elif args.what == "metrics":
        args.subjects = args.subjects or (10000 if args.quick else 100000)
        emit(metrics(args))
    else:
        args.jobs = args.jobs or (2000 if args.quick else 10000)
        emit(asyncio.run(startup(args)))


if __name__ == "__main__":
    main()
