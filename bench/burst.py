"""Benchmark: N jobs on one slot (the herd at the top of a minute, cron's everyday case).

    python bench/burst.py                      # full: 1,000 to 100,000 jobs, 3 repeats
    python bench/burst.py --quick              # smoke: 300 and 3,000 jobs, 1 repeat, ~2 min
    python bench/burst.py --counts 10000 --repeats 5 --modes service,apscheduler

N jobs fire on the same slot: cron `*/20 * * * * *` (every 20 s, seconds field), subjects
`<prefix>.<i>`. The jobs are created first; the slot measured is the first that begins
at least `--margin` (3) s after all N are in place, so creation never overlaps the herd
(creation starts right after a slot when it would otherwise end just before the next
one: no unmeasured full herd right before the measured one). One slot per trial, then
the scheduler is stopped. Modes, interleaved within a repeat (for each N: service,
service_k8x2, apscheduler, nats_schedules; then the next repeat), so drift hits all alike:
- service: one real `nats-cron serve` process (metrics on a free port), the jobs created
  while it leads with `fill_jobs` (the service's own JobManager, as through its API);
  in place once `nats-cron.status` reports N jobs (the leader's copy holds them all);
- service_k8x2: the same with two serve processes and 8 shards (`NATS_CRON_SHARDS=8`),
  the jobs created once each leads 4 shards; CPU is the sum of both, `loop_stall_s` the
  worse of the two (ratios `drain_k8x2_vs_service`, `cpu_k8x2_vs_service`);
- apscheduler: the baseline, plain APScheduler 3 in a child process (bench/_worker.py,
  role `burst`): AsyncIOScheduler + MemoryJobStore, `CronTrigger(second="*/20")` per
  job, each run publishing one core message with nats-cron's headers (no grace limit);
- nats_schedules: nats-server's own message schedules (2.12+): one schedule message per
  job (`Nats-Schedule: */20 * * * * *`, `Nats-Schedule-Target`) in a stream with
  `allow_msg_schedules` that republishes the targets to a core subject; the produced
  messages carry `Nats-Schedule-Next`, so their slot is Next - 20 s.

The observer is a separate process on a raw socket (bench/_rawsub.py), not nats-py:
nats-py spends ~1 s of Python per 100,000 received messages in its own parsing and
callbacks, which would blur the drain it is meant to measure. It stamps every message
with the time of the socket read that delivered it.

Per trial: `fired` (distinct subjects seen for the slot), `duplicates`, `first_s`,
`p50_s`, `p99_s`, `drain_s` (first arrival of each job's fire minus the slot: the
earliest, median, 99th percentile, last), `setup_s` (creation), CPU seconds of the
process under test from the slot to the end of the drain (service: the serve process;
apscheduler: its child; nats_schedules: nats-server) and its RSS; for service also
`lease_losses` (log lines "lost the lease..." from its start to the end of the herd, but
not the handovers of shards, "lost the lease: released";
`lease_losses_during_setup`: those before the slot), `fenced_lines` (lines containing
"fenced"), `loop_stall_s` (the longest event-loop delay during the herd: the service's
histogram nats_cron_loop_lag_seconds, a sample every 50 ms, scraped 1.5 s before the slot
and after the drain; the upper bound of the highest bucket that grew, so a bucket's
bound, not an exact time) and
`api_latency_ms` of `nats-cron.status` requests sent every 20 ms from 1 s before the
slot to the end of the drain (did the API keep answering during the herd?).

Prints one JSON object: per mode and N the medians of the repeats, the same-run ratios
the targets are stated in (drain service/apscheduler <= 0.6, p50/drain of service <= 0.6,
drain service/nats_schedules reported), whether every job fired once and no lease was
lost, and every run. `bench/plot_burst.py` draws it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# bench/ (its helpers) and the repository (nats_apscheduler, tests.helpers)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # type: ignore[import-not-found]
    LAG,
    PROCS,
    LocalServer,
    WorkerRun,
    connect,
    cpu_seconds,
    drop_service_state,
    emit,
    fill_jobs,
    machine,
    med,
    metrics_port,
    note,
    percentile,
    proc_status,
    ratio,
    scrape_buckets,
    serve_env,
    sleep_until,
    stall_bound,
    summary,
    wait_spread,
)
from _rawsub import RawSubscriber  # type: ignore[import-not-found]
from nats.aio.client import Client
from nats.js.api import RePublish, StreamConfig

from tests.helpers.cluster import ServeProcess

MODES = ("service", "service_k8x2", "apscheduler", "nats_schedules")
SERVICES = ("service", "service_k8x2")
SHARDED = {"service_k8x2": (2, 8)}  # instances, shards
PERIOD = 20  # seconds between slots
CRON = "*/20 * * * * *"
STATUS = "nats-cron.status"
TARGETS = {
    "drain_service_vs_apscheduler": 0.6,
    "p50_vs_drain_service": 0.6,
}
# Creation speed guesses (jobs/s) and fixed start-up (s), corrected by every trial; only
# used to decide whether to begin creating now or right after the next slot.
RATE = {"service": 3000.0, "service_k8x2": 3000.0, "apscheduler": 15000.0, "nats_schedules": 8000.0}
STARTUP = {"service": 0.3, "service_k8x2": 0.3, "apscheduler": 0.6, "nats_schedules": 0.1}
_seq = 0


def _tag(mode: str, count: int) -> str:
    global _seq
    _seq += 1
    return f"{mode[:3]}{count}x{_seq}"


def next_slot(t: float) -> int:
    """The first slot (unix s, a multiple of PERIOD) at or after t."""
    return math.ceil(t / PERIOD) * PERIOD


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


async def room_to_create(mode: str, count: int, margin: float) -> float:
    """Wait, if needed, so that creating `count` jobs plus the margin ends before a slot
    rather than just after one: if it would not fit before the next slot but fits in a
    whole period, begin right after that slot (else no full herd would fire, unmeasured,
    shortly before the measured one). If it cannot fit in a period at all, begin now:
    slots during creation then fire the jobs created so far (`earlier_slot_msgs`).
    Returns the seconds waited."""
    need = 1.5 * (STARTUP[mode] + count / RATE[mode]) + margin + 0.5
    now = time.time()
    to_next = next_slot(now) - now
    if need <= to_next or need > PERIOD - 0.5:
        return 0.0
    await asyncio.sleep(to_next + 0.2)
    return round(to_next + 0.2, 2)


def learn_rate(mode: str, count: int, setup_s: float | None) -> None:
    if setup_s and setup_s > STARTUP[mode] and count >= 100:
        RATE[mode] = count / max(0.05, setup_s - STARTUP[mode])


# --- the measured slot -------------------------------------------------------------------------


class ApiProber:
    """`nats-cron.status` requests on the bench's own connection, one every `interval` s
    (not waiting for the previous one): their latencies show whether, and how long, the
    service's API stopped answering."""

    def __init__(self, nc: Client, interval: float = 0.02, timeout: float = 10.0) -> None:
        self.nc = nc
        self.interval = interval
        self.timeout = timeout
        self.latencies: list[float] = []
        self.worst: tuple[float, float] = (-1.0, 0.0)  # latency, sent at (unix s)
        self.failures: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        t = time.monotonic()
        while True:
            self._tasks.append(asyncio.get_running_loop().create_task(self._one()))
            t += self.interval
            await asyncio.sleep(max(0.0, t - time.monotonic()))

    async def _one(self) -> None:
        sent, t0 = time.time(), time.perf_counter()
        try:
            await self.nc.request(STATUS, b"", timeout=self.timeout)
        except Exception as exc:
            name = type(exc).__name__
            self.failures[name] = self.failures.get(name, 0) + 1
            return
        latency = time.perf_counter() - t0
        self.latencies.append(latency)
        if latency > self.worst[0]:
            self.worst = (latency, sent)

    async def stop(self, slot: float) -> dict[str, Any]:
        """Stops sending; waits for the answers still due (up to the timeout)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        await asyncio.gather(*self._tasks, return_exceptions=True)
        result = summary(self.latencies)
        result["sent"] = len(self._tasks)
        if self.latencies:
            result["slowest_sent_after_slot_s"] = round(self.worst[1] - slot, 3)
        if self.failures:
            result["failures"] = self.failures
        return result


async def measure_slot(
    observer: RawSubscriber,
    slot: int,
    count: int,
    cpu_pids: dict[str, int],
    args: argparse.Namespace,
    *,
    nc: Client | None = None,
    metrics_ports: list[int] | None = None,
    rss_pid: int,
) -> dict[str, Any]:
    """The herd of `slot`: CPU from just before it to the end of the drain (the observer
    has seen every subject of the slot, or `--max-drain` s passed); for a service also
    the API probe and the loop-stall gauge."""
    result: dict[str, Any] = {}
    await observer.expect(slot * 1000, count)
    lags_before: list[dict[float, float] | None] = []
    if metrics_ports:
        await sleep_until(slot - 1.5)
        lags_before = [await scrape_buckets(port, LAG) for port in metrics_ports]
    prober = None
    if nc is not None:
        await sleep_until(slot - 1.0)
        prober = ApiProber(nc)
        prober.start()
    await sleep_until(slot - 0.2)
    c0 = {name: cpu_seconds(pid) for name, pid in cpu_pids.items()}
    complete = await observer.wait_complete(slot + args.max_drain - time.time())
    c1 = {name: cpu_seconds(pid) for name, pid in cpu_pids.items()}
    result["complete"] = complete is not None
    result["end_of_drain_after_slot_s"] = round(time.time() - slot, 3)
    if prober is not None:
        result["api_latency_ms"] = await prober.stop(slot)
    if metrics_ports:  # the worst instance's
        lags_after = [await scrape_buckets(port, LAG) for port in metrics_ports]
        stalls = [stall_bound(b, a) for b, a in zip(lags_before, lags_after, strict=True)]
        result["loop_stall_s"] = None if None in stalls else max(stalls, default=None)
    cpu = {
        name: None if c1[name] is None or c0[name] is None else round(c1[name] - c0[name], 2)
        for name in cpu_pids
    }
    result["cpu_s"] = cpu.pop("under_test")
    result["cpu_others_s"] = cpu
    memory = proc_status(rss_pid)
    result["rss_mb"], result["peak_rss_mb"] = memory.get("VmRSS"), memory.get("VmHWM")
    await asyncio.sleep(args.settle)  # late duplicates
    return result


def herd_stats(records: list[tuple[str, int | None, float]], slot: int, count: int) -> dict:
    """Fires of `slot` among the observer's records: the first arrival of each job's fire
    counts (later copies are `duplicates`); messages of other slots are counted apart."""
    slot_ms = slot * 1000
    first: dict[str, float] = {}
    total = earlier = later = unknown = 0
    for subject, s, t in records:
        if s == slot_ms:
            total += 1
            if subject not in first or t < first[subject]:
                first[subject] = t
        elif s is None:
            unknown += 1
        elif s < slot_ms:
            earlier += 1
        else:
            later += 1
    late = sorted(t - slot for t in first.values())
    return {
        "expected": count,
        "fired": len(first),
        "duplicates": total - len(first),
        "first_s": round(late[0], 4) if late else None,
        "p50_s": round(percentile(late, 50), 4) if late else None,
        "p99_s": round(percentile(late, 99), 4) if late else None,
        "drain_s": round(late[-1], 4) if late else None,
        "earlier_slot_msgs": earlier,
        "later_slot_msgs": later,
        "msgs_without_slot": unknown,
    }


async def start_observer(server: LocalServer, subject: str, tag: str) -> RawSubscriber:
    # In the server's temporary directory: removed with it, also on SIGTERM.
    fd, path = tempfile.mkstemp(prefix=f"burst-{tag}-", suffix=".txt", dir=server.dir)
    os.close(fd)
    observer = RawSubscriber(
        server.url,
        subject,
        Path(path),
        period_ms=PERIOD * 1000,
        register=PROCS.add,
        unregister=PROCS.items.remove,
    )
    await observer.start()
    return observer


async def finish_observer(observer: RawSubscriber, slot: int, count: int) -> dict[str, Any]:
    raw = await observer.stop()
    stats = herd_stats(raw.pop("records"), slot, count)
    raw.pop("event", None)
    raw.pop("records", None)
    stats["observer"] = raw
    return stats


# --- the modes ---------------------------------------------------------------------------------


async def service_trial(
    server: LocalServer,
    nc: Client,
    count: int,
    args: argparse.Namespace,
    *,
    instances: int = 1,
    shards: int = 1,
) -> dict[str, Any]:
    """`instances` serve processes sharing `shards` shards (1 and 1: the plain service).
    With several, the jobs are created once every instance leads its share of the
    shards; CPU is the sum over the instances, the loop stall the worst of them."""
    mode = "service" if instances == 1 else f"service_k{shards}x{instances}"
    tag = _tag(mode, count)
    prefix = f"burst.{tag}"
    env = {
        **serve_env(server.url, tag),
        "NATS_CRON_METRICS_PORT": "0",  # a free port, read from its log
        "NATS_CRON_METRICS_HOST": "127.0.0.1",
        "NATS_CRON_SHARDS": str(shards),
    }
    observer = await start_observer(server, f"{prefix}.>", tag)
    procs = [PROCS.add(ServeProcess(f"{tag}-i{n}", env)) for n in range(instances)]
    try:
        await asyncio.gather(*(p.await_log("leading: firing", timeout=60) for p in procs))
        ports = []
        for p in procs:
            ports.append(metrics_port(await p.await_log("metrics and health on", timeout=10)))
        if instances > 1:
            await wait_spread(nc, shards, instances)
        docs = [
            {"target": {"subject": f"{prefix}.{i}"}, "schedule": {"cron": CRON}}
            for i in range(count)
        ]
        waited = await room_to_create(mode, count, args.margin)
        t0 = time.time()
        fill_s = await fill_jobs(nc, env["NATS_CRON_JOBS_BUCKET"], docs)
        held = await wait_status_jobs(nc, count, timeout=120 + count / 500)
        setup_s = time.time() - t0
        learn_rate(mode, count, setup_s)
        slot = next_slot(time.time() + args.margin)
        note(f"{mode} x{count}: in place after {setup_s:.1f} s; slot {iso(slot)}")
        losses_in_setup = sum(1 for p in procs for ln in p.lines if _lease_lost(ln))
        pids = {f"under_test_{n}" if n else "under_test": p.proc.pid for n, p in enumerate(procs)}
        herd = await measure_slot(
            observer,
            slot,
            count,
            {**pids, "nats_server": server.pid, "observer": observer.pid, "bench": os.getpid()},
            args,
            nc=nc,
            metrics_ports=ports,
            rss_pid=procs[0].proc.pid,
        )
        if instances > 1:  # the service's CPU: all of its instances
            others = herd["cpu_others_s"]
            per = [herd["cpu_s"], *(others.pop(f"under_test_{n}") for n in range(1, instances))]
            herd["cpu_per_instance_s"] = per
            herd["cpu_s"] = None if None in per else round(sum(per), 2)
        # The log up to here (stopping the process logs a lease released, not lost).
        lines = [ln for p in procs for ln in p.lines]
        raw_lines = [raw for p in procs for raw in p.raw]
        for p in procs:
            p.stop()
        stats = await finish_observer(observer, slot, count)
        warnings = [ln for ln in lines if ln.get("level") in ("error", "warning")]
        result: dict[str, Any] = {
            "mode": mode,
            "count": count,
            "slot": iso(slot),
            **stats,
            "setup_s": round(setup_s, 3),
            "fill_s": round(fill_s, 3),
            "status_jobs": held,
            "waited_for_room_s": waited,
            **herd,
            "lease_losses": sum(1 for ln in lines if _lease_lost(ln)),
            "fenced_lines": sum(1 for raw in raw_lines if "fenced" in raw),
            "lease_losses_during_setup": losses_in_setup,
            "log_warnings": len(warnings),
        }
        if instances > 1:
            result["instances"], result["shards"] = instances, shards
        if warnings:
            result["first_warning"] = warnings[0].get("msg")
        return result
    finally:
        for p in procs:
            p.stop()
            with contextlib.suppress(ValueError):
                PROCS.items.remove(p)
        await observer.close()
        await drop_service_state(nc, tag)


def _lease_lost(line: dict[str, Any]) -> bool:
    """A lease lost (expired, fenced, connection), not one handed over on purpose (with
    shards, the first instance hands the second its share: "lost the lease: released")."""
    msg = str(line.get("msg", ""))
    return msg.startswith("lost the lease") and msg != "lost the lease: released"


async def sharded_trial(
    server: LocalServer, nc: Client, count: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Two instances, 8 shards: the same herd spread over two processes."""
    instances, shards = SHARDED["service_k8x2"]
    return await service_trial(server, nc, count, args, instances=instances, shards=shards)


async def wait_status_jobs(nc: Client, count: int, timeout: float) -> int:
    """Poll `nats-cron.status` until the leader reports `count` jobs; returns the last
    count seen (less than `count` if the timeout passed)."""
    deadline = time.monotonic() + timeout
    jobs = -1
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # not answering yet, or a slow reply: again
            reply = await nc.request(STATUS, b"", timeout=5)
            jobs = int(json.loads(reply.data).get("jobs", -1))
        if jobs >= count:
            break
        await asyncio.sleep(0.1)
    return jobs


async def apscheduler_trial(
    server: LocalServer, nc: Client, count: int, args: argparse.Namespace
) -> dict[str, Any]:
    tag = _tag("apscheduler", count)
    prefix = f"burst.{tag}"
    observer = await start_observer(server, f"{prefix}.>", tag)
    run = WorkerRun(
        {
            "role": "burst",
            "url": server.url,
            "prefix": prefix,
            "count": count,
            "period": PERIOD,
            "margin": args.margin,
        }
    )
    try:
        waited = await room_to_create("apscheduler", count, args.margin)
        t0 = time.time()
        await run.start()
        armed = await run.next_line(timeout=120 + count / 500)
        spawn_to_armed = time.time() - t0
        learn_rate("apscheduler", count, spawn_to_armed)
        slot, pid = int(armed["slot"]), int(armed["pid"])
        note(f"apscheduler x{count}: in place after {spawn_to_armed:.1f} s; slot {iso(slot)}")
        herd = await measure_slot(
            observer,
            slot,
            count,
            {
                "under_test": pid,
                "nats_server": server.pid,
                "observer": observer.pid,
                "bench": os.getpid(),
            },
            args,
            rss_pid=pid,
        )
        await run.close()
        stats = await finish_observer(observer, slot, count)
        return {
            "mode": "apscheduler",
            "count": count,
            "slot": iso(slot),
            **stats,
            "setup_s": armed["setup_s"],
            "spawn_to_armed_s": round(spawn_to_armed, 3),
            "waited_for_room_s": waited,
            **herd,
        }
    finally:
        await run.close()
        await observer.close()


async def schedules_trial(
    server: LocalServer, nc: Client, count: int, args: argparse.Namespace
) -> dict[str, Any]:
    """nats-server message schedules: `count` schedules `*/20 * * * * *` in one stream.

    Produced messages are stored in the stream (core subscribers of the target see
    nothing); the stream republishes them to `out.<tag>.>` for the observer.
    """
    tag = _tag("nats_schedules", count)
    stream = f"SCH_{tag}"
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=stream,
            subjects=[f"sch.{tag}.>", f"tgt.{tag}.>"],
            allow_msg_schedules=True,
            republish=RePublish(src=f"tgt.{tag}.>", dest=f"out.{tag}.>"),
            max_msgs_per_subject=10,
        )
    )
    observer = await start_observer(server, f"out.{tag}.>", tag)
    try:
        waited = await room_to_create("nats_schedules", count, args.margin)
        t0 = time.time()
        pending = []
        for i in range(count):
            headers = {"Nats-Schedule": CRON, "Nats-Schedule-Target": f"tgt.{tag}.{i}"}
            pending.append(await js.publish_async(f"sch.{tag}.{i}", b"", headers=headers))
        await asyncio.gather(*pending)
        setup_s = time.time() - t0
        learn_rate("nats_schedules", count, setup_s)
        slot = next_slot(time.time() + args.margin)
        note(f"nats_schedules x{count}: in place after {setup_s:.1f} s; slot {iso(slot)}")
        herd = await measure_slot(
            observer,
            slot,
            count,
            {"under_test": server.pid, "observer": observer.pid, "bench": os.getpid()},
            args,
            rss_pid=server.pid,
        )
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
        stats = await finish_observer(observer, slot, count)
        return {
            "mode": "nats_schedules",
            "count": count,
            "slot": iso(slot),
            **stats,
            "setup_s": round(setup_s, 3),
            "waited_for_room_s": waited,
            **herd,
        }
    finally:
        await observer.close()
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)


TRIALS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "service": service_trial,
    "service_k8x2": sharded_trial,
    "apscheduler": apscheduler_trial,
    "nats_schedules": schedules_trial,
}


async def trial(
    server: LocalServer, nc: Client, mode: str, count: int, args: argparse.Namespace
) -> dict[str, Any]:
    started = time.time()
    load = round(os.getloadavg()[0], 2)
    try:
        result = await TRIALS[mode](server, nc, count, args)
    except Exception as exc:  # a trial that crashes is a failed trial, reported as such
        note(f"{mode} x{count}: failed: {type(exc).__name__}: {exc}")
        result = {"mode": mode, "count": count, "error": f"{type(exc).__name__}: {exc}"}
    result["wall_s"] = round(time.time() - started, 1)
    result["loadavg_1m"] = load
    extra = ""
    if mode in SERVICES:
        extra = (
            f", lease losses {result.get('lease_losses')}, loop stall "
            f"{result.get('loop_stall_s')} s, api max "
            f"{(result.get('api_latency_ms') or {}).get('max_ms')} ms"
        )
    note(
        f"{mode:>15} x{count:<6} fired {result.get('fired')}/{count} "
        f"dup {result.get('duplicates')}, first {result.get('first_s')} p50 "
        f"{result.get('p50_s')} p99 {result.get('p99_s')} drain {result.get('drain_s')} s, "
        f"cpu {result.get('cpu_s')} s{extra}"
    )
    return result


# --- the report --------------------------------------------------------------------------------

MEDIAN_OF = (
    "fired",
    "duplicates",
    "first_s",
    "p50_s",
    "p99_s",
    "drain_s",
    "setup_s",
    "cpu_s",
    "rss_mb",
    "peak_rss_mb",
)
SERVICE_MEDIAN_OF = ("lease_losses", "fenced_lines", "loop_stall_s")


def medians(rs: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    out: dict[str, Any] = {key: med(r.get(key) for r in rs) for key in MEDIAN_OF}
    if mode in SERVICES:
        out.update({key: med(r.get(key) for r in rs) for key in SERVICE_MEDIAN_OF})
        api = [r.get("api_latency_ms") or {} for r in rs]
        out["api_p99_ms"] = med(a.get("p99_ms") for a in api)
        out["api_max_ms"] = med(a.get("max_ms") for a in api)
    out["runs"] = len(rs)
    return out


def _complete(r: dict[str, Any] | None) -> bool:
    return bool(r) and r.get("fired") == r.get("expected") and r.get("drain_s") is not None  # type: ignore[union-attr]


def same_run_ratios(runs: dict[str, dict[int, list[dict[str, Any]]]], count: int) -> dict:
    """Ratios within each repeat (runs back to back), then their median; a run in which
    not every job fired has no drain to compare and is left out."""

    def at(mode: str, i: int) -> dict[str, Any] | None:
        rs = runs.get(mode, {}).get(count, [])
        return rs[i] if i < len(rs) else None

    repeats = max((len(v.get(count, [])) for v in runs.values()), default=0)
    pairs = {
        "drain_service_vs_apscheduler": ("service", "drain_s", "apscheduler", "drain_s"),
        "p50_vs_drain_service": ("service", "p50_s", "service", "drain_s"),
        "drain_service_vs_nats_schedules": ("service", "drain_s", "nats_schedules", "drain_s"),
        "drain_k8x2_vs_service": ("service_k8x2", "drain_s", "service", "drain_s"),
        "cpu_k8x2_vs_service": ("service_k8x2", "cpu_s", "service", "cpu_s"),
    }
    out: dict[str, Any] = {}
    for name, (ma, ka, mb, kb) in pairs.items():
        if ma not in runs or mb not in runs:
            continue
        values = []
        for i in range(repeats):
            a, b = at(ma, i), at(mb, i)
            if _complete(a) and _complete(b):
                values.append(ratio(a[ka], b[kb]))  # type: ignore[index]
        entry: dict[str, Any] = {"median": med(values), "runs": values}
        if name in TARGETS:
            entry["target"] = f"<= {TARGETS[name]}"
            entry["met"] = None if entry["median"] is None else entry["median"] <= TARGETS[name]
        out[name] = entry
    return out


def checks(rs: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "every_job_fired_once": bool(rs)
        and all(r.get("fired") == r.get("expected") and r.get("duplicates") == 0 for r in rs),
        "errors": sum(1 for r in rs if "error" in r),
    }
    if mode in SERVICES:
        out["no_lease_lost"] = bool(rs) and all(r.get("lease_losses") == 0 for r in rs)
    return out


async def main(args: argparse.Namespace) -> None:
    started = time.time()
    mach = machine()
    server = LocalServer().start()
    nc = await connect(server.url)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        m: {n: [] for n in args.counts} for m in args.modes
    }
    try:
        for rep in range(args.repeats):
            for count in args.counts:
                for mode in args.modes:
                    note(f"repeat {rep + 1}/{args.repeats}: {mode} x{count}")
                    runs[mode][count].append(await trial(server, nc, mode, count, args))
    finally:
        await nc.close()
        server.stop()

    report: dict[str, Any] = {
        "benchmark": "burst",
        "date": iso(started),
        "config": {
            "counts": args.counts,
            "modes": args.modes,
            "repeats": args.repeats,
            "cron": CRON,
            "period_s": PERIOD,
            "margin_s": args.margin,
            "max_drain_s": args.max_drain,
            "settle_s": args.settle,
            "quick": args.quick,
            "nats_server": (server.server.log and _server_version(server.server.log)) or None,
        },
        "machine": mach,
        "median": {
            mode: {str(n): medians(rs, mode) for n, rs in per_n.items()}
            for mode, per_n in runs.items()
        },
        "ratios": {str(n): same_run_ratios(runs, n) for n in args.counts},
        "checks": {
            mode: {str(n): checks(rs, mode) for n, rs in per_n.items()}
            for mode, per_n in runs.items()
        },
        "runs": {mode: {str(n): rs for n, rs in per_n.items()} for mode, per_n in runs.items()},
        "wall_s": round(time.time() - started, 1),
    }
    emit(report)


def _server_version(log: list[str]) -> str | None:
    for line in log:
        match = re.search(r"Version:\s+(\S+)", line)
        if match:
            return match.group(1)
    return None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Progress goes to stderr, the JSON report to stdout.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 300 and 3,000 jobs, one repeat"
    )
    parser.add_argument("--counts", help="comma-separated job counts (1000,10000,30000,100000)")
    parser.add_argument("--repeats", type=int, help="runs per mode and count, interleaved (3)")
    parser.add_argument("--modes", help=f"comma-separated, of {', '.join(MODES)} (all)")
    parser.add_argument(
        "--margin", type=float, default=3.0, help="seconds from jobs in place to the slot (3)"
    )
    parser.add_argument(
        "--max-drain",
        type=float,
        default=19.0,
        help="give up on a herd this many seconds after its slot (19: before the next slot)",
    )
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds to wait for late duplicates (1)"
    )
    args = parser.parse_args()
    if args.counts:
        args.counts = [int(c) for c in args.counts.split(",")]
    else:
        args.counts = [300, 3000] if args.quick else [1000, 10000, 30000, 100000]
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.modes = args.modes.split(",") if args.modes else list(MODES)
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
