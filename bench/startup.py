"""Benchmark: start-up with many stored jobs, until the leader fires; follower readiness.

    python bench/startup.py                       # full: 10,000 and 100,000 jobs, 3 repeats
    python bench/startup.py --quick               # smoke: 2,000 jobs, 1 repeat, < 60 s
    python bench/startup.py --sizes 10000 --repeats 5 --profile bench/profiles

Per size, the jobs bucket is filled through the service's own JobManager and
JetStreamJobStore (validated documents, the store's record format, pipelined
compare-and-set creates): `size` jobs `every 1h` with phases spread over the hour, so
almost none is due, plus one job `every 1s`, which is due whenever an instance starts (at
least 1.1 s pass between runs) and is fired at once by the new leader as a missed slot.
Then, each repeat, measured from the spawn of the process (wall clock of this machine):
- raw_watch (baseline): a fresh Python process opens a KV watch of the bucket and receives
  every key, decoding nothing: `load_s` (watch start to last key) and spawn to loaded;
- store_open: a fresh process runs `await JetStreamJobStore(bucket, nc).open()` (decode,
  build the Job objects, index them): `load_s` and spawn to loaded;
- leader: a fresh `nats-cron serve` (LOG_LEVEL=debug, the only level that logs "job
  store loaded"): spawn to store loaded, to "instance started" (ready: API up, election
  running), to "won the lease", to the first fire received by a subscriber here;
- follower: a second `nats-cron serve` started while the leader runs: spawn to store
  loaded and to ready.
Times come from the processes' own JSON log timestamps (ms). Prints one JSON object: per
size the fill time, every run, the medians and the ratios to the raw-watch baseline.
`--profile DIR`: py-spy record of one extra leader start per size (raw stacks in DIR and a
per-function summary in the report).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

# bench/ (its helpers) and the repository (nats_apscheduler, tests.helpers)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # type: ignore[import-not-found]
    PROCS,
    FireCollector,
    LocalServer,
    Profiler,
    WorkerRun,
    connect,
    drop_service_state,
    emit,
    every_doc,
    fill_jobs,
    log_time,
    machine,
    med,
    note,
    proc_status,
    ratio,
    serve_env,
    spread_docs,
)
from nats.aio.client import Client

from tests.helpers.cluster import ServeProcess

TIMEOUT = 600.0


async def child(role: str, url: str, bucket: str) -> dict[str, Any]:
    run = WorkerRun({"role": role, "url": url, "bucket": bucket, "spawned_at": time.time()})
    await run.start()
    try:
        result = await run.wait(timeout=TIMEOUT)
    finally:
        await run.close()
    result.pop("event", None)
    return result


async def leader_start(
    url: str, name: str, collector: FireCollector, profile: Path | None
) -> dict[str, Any]:
    env = serve_env(url, name, log_level="debug")
    before = len(collector.records)
    spawned = time.time()
    leader = PROCS.add(ServeProcess(f"{name}-a", env))
    profiler = Profiler(leader.proc.pid, TIMEOUT, profile) if profile is not None else None
    follower = None
    try:
        loaded = await leader.await_log("job store loaded", timeout=TIMEOUT)
        started = await leader.await_log("nats-cron instance started", timeout=TIMEOUT)
        won = await leader.await_log("won the lease", timeout=TIMEOUT)
        deadline = time.time() + 30
        while len(collector.records) == before and time.time() < deadline:
            await asyncio.sleep(0.002)
        first = collector.records[before][1] if len(collector.records) > before else None
        run: dict[str, Any] = {
            "jobs_loaded": int(str(loaded["msg"]).split()[3]),
            "to_store_loaded_s": round(log_time(loaded) - spawned, 3),
            "to_ready_s": round(log_time(started) - spawned, 3),
            "to_leader_s": round(log_time(won) - spawned, 3),
            "to_first_fire_s": round(first - spawned, 3) if first is not None else None,
            "rss_mb": proc_status(leader.proc.pid).get("VmRSS"),
        }
        if profiler is not None:
            assert profiler.proc is not None
            profiler.proc.send_signal(signal.SIGINT)  # py-spy writes what it has so far
            run["profile"] = await profiler.finish()
            return run
        # A follower joins while the leader runs.
        f_spawned = time.time()
        follower = PROCS.add(ServeProcess(f"{name}-b", env))
        f_loaded = await follower.await_log("job store loaded", timeout=TIMEOUT)
        f_started = await follower.await_log("nats-cron instance started", timeout=TIMEOUT)
        run["follower_to_store_loaded_s"] = round(log_time(f_loaded) - f_spawned, 3)
        run["follower_to_ready_s"] = round(log_time(f_started) - f_spawned, 3)
        return run
    finally:
        if follower is not None:
            follower.stop()
        leader.stop()


async def one_size(
    nc: Client, url: str, size: int, repeats: int, profile_dir: Path | None
) -> dict[str, Any]:
    name = f"st{size}"
    bucket = f"{name}-jobs"
    docs = spread_docs(f"bench.{name}", size, every_s=3600)
    docs.append(every_doc(f"bench.{name}.probe", "1s"))
    note(f"filling {size} jobs")
    fill_s = await fill_jobs(nc, bucket, docs, batch=5000)
    note(f"filled in {fill_s:.1f} s")
    info = await nc.jetstream().stream_info(f"KV_{bucket}")
    collector = FireCollector()
    sub = await collector.subscribe(nc, f"bench.{name}.>")
    runs: list[dict[str, Any]] = []
    try:
        for r in range(repeats):
            await asyncio.sleep(1.1)  # the probe job's slot passes while nobody leads
            raw = await child("raw_watch", url, bucket)
            opened = await child("store_open", url, bucket)
            await asyncio.sleep(1.1)
            started = await leader_start(url, name, collector, None)
            run = {"raw_watch": raw, "store_open": opened, "serve": started}
            note(
                f"{size} jobs, run {r + 1}: raw {raw['load_s']} s, open {opened['load_s']} s, "
                f"serve loaded {started['to_store_loaded_s']} s, leader "
                f"{started['to_leader_s']} s, fire {started['to_first_fire_s']} s, follower "
                f"ready {started.get('follower_to_ready_s')} s"
            )
            runs.append(run)
        profile = None
        if profile_dir is not None:
            await asyncio.sleep(1.1)
            profile = (
                await leader_start(url, name, collector, profile_dir / f"startup-{size}.txt")
            ).get("profile")
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        await drop_service_state(nc, name)

    def m(part: str, key: str) -> float | None:
        return med(run[part].get(key) for run in runs)

    medians = {
        "raw_watch_load_s": m("raw_watch", "load_s"),
        "raw_watch_spawn_to_loaded_s": m("raw_watch", "spawn_to_loaded_s"),
        "store_open_load_s": m("store_open", "load_s"),
        "store_open_spawn_to_loaded_s": m("store_open", "spawn_to_loaded_s"),
        "serve_to_store_loaded_s": m("serve", "to_store_loaded_s"),
        "serve_to_ready_s": m("serve", "to_ready_s"),
        "serve_to_leader_s": m("serve", "to_leader_s"),
        "serve_to_first_fire_s": m("serve", "to_first_fire_s"),
        "follower_to_store_loaded_s": m("serve", "follower_to_store_loaded_s"),
        "follower_to_ready_s": m("serve", "follower_to_ready_s"),
        "serve_rss_mb": m("serve", "rss_mb"),
        "store_open_rss_mb": m("store_open", "rss_mb"),
    }
    result: dict[str, Any] = {
        "jobs": size + 1,
        "bucket_bytes": int(info.state.bytes),
        "fill_s": round(fill_s, 2),
        "fill_jobs_per_s": round((size + 1) / fill_s),
        "median": medians,
        "ratios": {
            "store_open_load / raw_watch_load": ratio(
                medians["store_open_load_s"], medians["raw_watch_load_s"]
            ),
            "serve_to_store_loaded / raw_watch_spawn_to_loaded": ratio(
                medians["serve_to_store_loaded_s"], medians["raw_watch_spawn_to_loaded_s"]
            ),
            "serve_to_first_fire / raw_watch_spawn_to_loaded": ratio(
                medians["serve_to_first_fire_s"], medians["raw_watch_spawn_to_loaded_s"]
            ),
        },
        "runs": runs,
    }
    if profile is not None:
        result["profile_leader_start"] = profile
    return result


async def main(args: argparse.Namespace) -> None:
    server = LocalServer().start()
    nc = await connect(server.url)
    sizes: dict[str, Any] = {}
    try:
        for size in args.sizes:
            sizes[str(size)] = await one_size(
                nc,
                server.url,
                size,
                args.repeats,
                Path(args.profile) if args.profile else None,
            )
    finally:
        await nc.close()
        server.stop()
    emit(
        {
            "benchmark": "startup",
            "config": {"sizes": args.sizes, "repeats": args.repeats, "quick": args.quick},
            "machine": machine(),
            "sizes": sizes,
        }
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 jobs, one repeat")
    parser.add_argument("--sizes", help="comma-separated job counts (10000,100000)")
    parser.add_argument("--repeats", type=int, help="starts per size (3)")
    parser.add_argument("--profile", help="directory: py-spy one extra leader start per size")
    args = parser.parse_args()
    default = "2000" if args.quick else "10000,100000"
    args.sizes = [int(s) for s in (args.sizes or default).split(",")]
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
