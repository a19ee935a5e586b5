"""Benchmark: CPU and memory per 1,000 jobs, idle and while firing 1,000 jobs/s.

    python bench/resources.py                 # full: 0, 1k, 10k, 100k jobs idle; 20 s firing
    python bench/resources.py --quick         # smoke: 0 and 2,000 jobs, 3 s windows, < 60 s
    python bench/resources.py --sizes 0,1000,10000 --idle 20 --duration 30 --repeats 3

Idle: `size` jobs `every 24h` (phases spread over the day: with 100,000 jobs about one
fires per second, which is counted in),
stored through the service's JobManager/JetStreamJobStore; then a fresh `nats-cron serve`
leads, settles, and its CPU seconds per second (utime+stime from /proc/<pid>/stat) and RSS
(VmRSS, VmHWM from /proc/<pid>/status) are read over `--idle` seconds. Baselines in the same
run: an AsyncIOScheduler + MemoryJobStore process with the same jobs (APScheduler
IntervalTrigger, 24 h), and the same with JetStreamJobStore (plugin mode; its jobs are
added in that process, so its RSS includes the peak of writing them all to KV).
Firing: 1,000 jobs every 1 s (phases spread) for `--duration` s: the serve process (lateness
at a subscriber, as in fire_ceiling.py), the memory baseline and the plugin.
Per 1,000 jobs: (RSS at size - RSS with no job) / (size / 1000); idle CPU likewise; firing
CPU is per 1,000 fires/s (minus the idle CPU of 1,000 jobs). nats-server's CPU is
reported next to each. Prints one JSON object; with --repeats, medians.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path
from typing import Any

# bench/ (its helpers) and the repository (nats_apscheduler, tests.helpers)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # type: ignore[import-not-found]
    PROCS,
    CpuWindow,
    LocalServer,
    connect,
    drop_service_state,
    emit,
    fill_jobs,
    machine,
    med,
    note,
    proc_status,
    ratio,
    serve_env,
    sleep_until,
    spread_docs,
)
from _trials import trial  # type: ignore[import-not-found]
from nats.aio.client import Client

from tests.helpers.cluster import ServeProcess

_seq = 0
IDLE_INTERVAL = 86400  # idle jobs fire every 24 h, phases spread over the day


async def service_idle(server: LocalServer, nc: Client, size: int, idle: float) -> dict[str, Any]:
    global _seq
    _seq += 1
    name = f"res{size}x{_seq}"
    env = serve_env(server.url, name)
    fill_s = 0.0
    if size:
        fill_s = await fill_jobs(
            nc,
            env["NATS_CRON_JOBS_BUCKET"],
            spread_docs(f"bench.{name}", size, every_s=IDLE_INTERVAL),
            batch=5000,
        )
    proc = PROCS.add(ServeProcess(f"{name}-1", env))
    try:
        await proc.await_log("won the lease", timeout=600)
        w0 = math.ceil(time.time() + 2.0)  # settle: the load's garbage, first refreshes
        await sleep_until(w0)
        cpu = CpuWindow({"serve": proc.proc.pid, "nats_server": server.pid})
        cpu.start()
        await sleep_until(w0 + idle)
        cpu.stop()
        memory = proc_status(proc.proc.pid)
        result = {
            "mode": "service",
            "count": size,
            "cpu": cpu.result,
            "cpu_s_per_s": cpu.result["serve"],
            "rss_mb": memory.get("VmRSS"),
            "peak_rss_mb": memory.get("VmHWM"),
            "fill_s": round(fill_s, 2),
        }
        note(f"service idle x{size}: cpu {cpu.result}, rss {memory}")
        return result
    finally:
        proc.stop()
        await drop_service_state(nc, name)


def per_thousand(rows: dict[int, dict[str, Any]], key: str) -> dict[str, float | None]:
    base = rows.get(0, {}).get(key)
    out: dict[str, float | None] = {}
    for size, row in rows.items():
        if size and base is not None and row.get(key) is not None:
            out[str(size)] = round((row[key] - base) / (size / 1000), 4)
    return out


async def main(args: argparse.Namespace) -> None:
    server = LocalServer().start()
    nc = await connect(server.url)
    idle: dict[str, dict[int, list[dict[str, Any]]]] = {
        "service": {},
        "memory": {},
        "jetstream": {},
    }
    firing: dict[str, list[dict[str, Any]]] = {"service": [], "memory": [], "jetstream": []}
    try:
        for _ in range(args.repeats):
            for size in args.sizes:
                idle["service"].setdefault(size, []).append(
                    await service_idle(server, nc, size, args.idle)
                )
                for mode in ("memory", "jetstream"):
                    idle[mode].setdefault(size, []).append(
                        await trial(
                            server, nc, mode, size, int(args.idle), 1.0, interval=IDLE_INTERVAL
                        )
                    )
            for mode in ("memory", "jetstream", "service"):
                firing[mode].append(
                    await trial(server, nc, mode, args.rate, args.duration, args.warmup)
                )
    finally:
        await nc.close()
        server.stop()

    def cpu_of(r: dict[str, Any], mode: str) -> float | None:
        if r.get("cpu_s_per_s") is not None:
            return float(r["cpu_s_per_s"])
        cpu = r.get("cpu") or {}
        return cpu.get("serve" if mode == "service" else "worker")

    idle_med: dict[str, dict[int, dict[str, Any]]] = {}
    for mode, by_size in idle.items():
        idle_med[mode] = {
            size: {
                "cpu_s_per_s": med(cpu_of(r, mode) for r in rs),
                "rss_mb": med(r.get("rss_mb") for r in rs),
                "peak_rss_mb": med(r.get("peak_rss_mb") for r in rs),
                "nats_server_cpu_s_per_s": med((r.get("cpu") or {}).get("nats_server") for r in rs),
            }
            for size, rs in by_size.items()
        }
    firing_med = {
        mode: {
            "fires_per_s": args.rate,
            "cpu_s_per_s": med(cpu_of(r, mode) for r in rs),
            "nats_server_cpu_s_per_s": med((r.get("cpu") or {}).get("nats_server") for r in rs),
            "rss_mb": med(r.get("rss_mb") for r in rs),
            "lateness_p99_ms": med((r.get("lateness") or {}).get("p99_ms") for r in rs),
            "missed": med(r.get("missed") for r in rs),
        }
        for mode, rs in firing.items()
    }
    per_1000: dict[str, Any] = {}
    for mode in idle_med:
        rows = idle_med[mode]
        idle_1000 = None
        if 0 in rows:
            per_k = per_thousand(rows, "cpu_s_per_s")
            idle_1000 = per_k.get("1000")
        fire_cpu = firing_med[mode]["cpu_s_per_s"]
        base_cpu = rows.get(0, {}).get("cpu_s_per_s")
        per_1000[mode] = {
            "rss_mb_per_1000_jobs": per_thousand(rows, "rss_mb"),
            "idle_cpu_s_per_s_per_1000_jobs": per_thousand(rows, "cpu_s_per_s"),
            "firing_cpu_s_per_1000_fires": (
                None
                if fire_cpu is None or base_cpu is None
                else round((fire_cpu - base_cpu - (idle_1000 or 0)) * 1000 / args.rate, 4)
            ),
        }
    report = {
        "benchmark": "resources",
        "config": {
            "sizes": args.sizes,
            "idle_s": args.idle,
            "fires_per_s": args.rate,
            "duration_s": args.duration,
            "repeats": args.repeats,
            "quick": args.quick,
        },
        "machine": machine(),
        "per_1000": per_1000,
        "ratio_to_memory": {
            mode: {
                "firing_cpu": ratio(
                    per_1000[mode]["firing_cpu_s_per_1000_fires"],
                    per_1000["memory"]["firing_cpu_s_per_1000_fires"],
                ),
                "rss_per_1000_jobs_at_largest": ratio(
                    per_1000[mode]["rss_mb_per_1000_jobs"].get(str(max(args.sizes))),
                    per_1000["memory"]["rss_mb_per_1000_jobs"].get(str(max(args.sizes))),
                ),
            }
            for mode in ("jetstream", "service")
        },
        "idle": {m: {str(k): v for k, v in rows.items()} for m, rows in idle_med.items()},
        "firing": firing_med,
    }
    emit(report)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0 and 2,000 jobs, 3 s windows")
    parser.add_argument("--sizes", help="comma-separated job counts, 0 first (0,1000,10000,100000)")
    parser.add_argument("--idle", type=float, help="idle window, seconds (10)")
    parser.add_argument("--rate", type=int, default=1000, help="fires/s while firing")
    parser.add_argument("--duration", type=int, help="firing window, seconds (20)")
    parser.add_argument("--warmup", type=float, help="seconds before the firing window (3)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    default = "0,2000" if args.quick else "0,1000,10000,100000"
    args.sizes = [int(s) for s in (args.sizes or default).split(",")]
    args.idle = args.idle or (2.0 if args.quick else 10.0)
    args.duration = args.duration or (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
