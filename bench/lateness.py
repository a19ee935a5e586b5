"""Benchmark: fire lateness at 1,000 fires/s, nats-cron against APScheduler and nats-server.

    python bench/lateness.py                  # full: 20 s windows, 3 repeats
    python bench/lateness.py --quick          # smoke: 4 s, 1 repeat, < 60 s
    python bench/lateness.py --rate 2000 --duration 30 --repeats 5 --phases aligned

1,000 jobs every 1 s (`--rate`), phases spread evenly over the second, for each mode:
- memory: AsyncIOScheduler + MemoryJobStore (the baseline; lateness when the job
  function starts, scheduled time from EVENT_JOB_SUBMITTED);
- jetstream: AsyncIOScheduler + JetStreamJobStore (plugin mode, shared connection);
- service: a `nats-cron serve` process; lateness = receive time at a subscriber on another
  connection minus the fire's Nats-Cron-Scheduled header;
- nats_schedules: nats-server's own message schedules (a stream with allow_msg_schedules,
  one schedule message per job with `Nats-Schedule: @every 1s` and Nats-Schedule-Target),
  received through the stream's republish at a core subscriber. The server puts every
  `@every 1s` slot on a whole second (phases cannot be spread: all schedules fire
  together) and adds Nats-Scheduler and Nats-Schedule-Next (second resolution) to each
  produced message: the slot is Next - 1 s. `stored_lateness` is the server's own
  timestamp of the stored message (Nats-Time-Stamp) minus the slot.
- (reference, `--modes` to add: background, memory_publish)

The modes of one repeat run back to back, repeats interleave. Prints one JSON object: per
mode the runs and the medians over repeats of p50/p99/max (ms) and missed slots, with the
ratio of each median to the memory baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

# bench/ (its helpers) and the repository (nats_apscheduler, tests.helpers)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LocalServer, connect, emit, machine, med, ratio  # type: ignore[import-not-found]
from _trials import ALL_MODES, trial  # type: ignore[import-not-found]

DEFAULT_MODES = ("memory", "jetstream", "service", "nats_schedules")
KEEP = (
    "expected",
    "fired",
    "missed",
    "duplicates",
    "lateness",
    "stored_lateness",
    "cpu",
    "kv_writes_per_fire",
    "rss_mb",
    "error",
    "function_lateness",
    "log_warnings",
)


async def main(args: argparse.Namespace) -> None:
    server = LocalServer().start()
    nc = await connect(server.url)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.modes}
    try:
        for _ in range(args.repeats):
            for mode in args.modes:
                runs[mode].append(
                    await trial(
                        server, nc, mode, args.rate, args.duration, args.warmup, phases=args.phases
                    )
                )
    finally:
        await nc.close()
        server.stop()

    medians: dict[str, dict[str, Any]] = {}
    for mode, rs in runs.items():
        lat = [r.get("lateness") or {} for r in rs]
        medians[mode] = {
            "p50_ms": med(x.get("p50_ms") for x in lat),
            "p99_ms": med(x.get("p99_ms") for x in lat),
            "max_ms": med(x.get("max_ms") for x in lat),
            "missed": med(r.get("missed") for r in rs),
        }
        if mode == "nats_schedules":
            stored = [r.get("stored_lateness") or {} for r in rs]
            medians[mode]["stored_p50_ms"] = med(x.get("p50_ms") for x in stored)
            medians[mode]["stored_p99_ms"] = med(x.get("p99_ms") for x in stored)
    base = medians.get("memory", {})
    report: dict[str, Any] = {
        "benchmark": "lateness",
        "config": {
            "fires_per_s": args.rate,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "repeats": args.repeats,
            "phases": args.phases,
            "quick": args.quick,
        },
        "machine": machine(),
        "median": medians,
        "ratio_to_memory": {
            mode: {k: ratio(v.get(k), base.get(k)) for k in ("p50_ms", "p99_ms", "max_ms")}
            for mode, v in medians.items()
            if mode != "memory"
        },
        "runs": {m: [{k: r[k] for k in KEEP if k in r} for r in rs] for m, rs in runs.items()},
    }
    emit(report)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 s, one repeat")
    parser.add_argument("--rate", type=int, default=1000, help="jobs every 1 s (fires/s)")
    parser.add_argument("--duration", type=int, help="seconds measured per run (20)")
    parser.add_argument("--warmup", type=float, help="seconds before the window (3)")
    parser.add_argument("--repeats", type=int, help="runs per mode, interleaved (3)")
    parser.add_argument("--modes", help=f"comma-separated, of {', '.join(ALL_MODES)}")
    parser.add_argument("--phases", choices=("spread", "aligned"), default="spread")
    args = parser.parse_args()
    args.duration = args.duration or (4 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.modes = args.modes.split(",") if args.modes else list(DEFAULT_MODES)
    for mode in args.modes:
        if mode not in ALL_MODES:
            parser.error(f"unknown mode {mode!r}")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
