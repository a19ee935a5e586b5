"""One fire trial: N jobs every 1 s for D seconds, in one of the measured set-ups.

Used by fire_ceiling.py, lateness.py and resources.py. A trial returns a dict with
`lateness` (p50/p99/max ms of actual - scheduled over the window), `expected`, `fired`,
`missed`, `duplicates`, CPU seconds per second of the processes involved and, where it
applies, KV writes per fire and a py-spy profile of the process under test.

Modes:
- memory, background, jetstream, memory_publish: an APScheduler child (bench/_worker.py);
  lateness is taken when the job function starts, except memory_publish (at a subscriber);
- service: a real `nats-cron serve` process (leader, fence, run state, history, headers);
  the jobs are created through the service's JobManager while it leads, lateness is
  `Nats-Cron-Scheduled` vs the receive time at a subscriber on this (separate) connection,
  and missed slots are counted by job and scheduled time (the Nats-Msg-Id);
- nats_schedules: nats-server's own message schedules (`Nats-Schedule: @every 1s`,
  stream option allow_msg_schedules, republished to a core subject for the subscriber).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import (  # type: ignore[import-not-found]
    LAG,
    PROCS,
    CpuWindow,
    FireCollector,
    LocalServer,
    Profiler,
    drop_service_state,
    every_doc,
    fill_jobs,
    fire_stats,
    kv_last_seq,
    lag_samples_above,
    log_time,
    metrics_port,
    note,
    proc_status,
    scrape_buckets,
    serve_env,
    sleep_until,
    spread_docs,
    stall_bound,
    summary,
    wait_spread,
)
from nats.aio.client import Client
from nats.js.api import RePublish, StreamConfig

from tests.helpers.cluster import ServeProcess

WORKER_MODES = ("memory", "background", "jetstream", "memory_publish")
# `service_k8x2`: two `serve` instances sharing 8 shards (the same jobs, the same subscriber).
SHARDED = {"service_k8x2": (2, 8)}
ALL_MODES = (*WORKER_MODES, "service", *SHARDED, "nats_schedules")
_seq = 0


def _tag(mode: str, count: int) -> str:
    global _seq
    _seq += 1
    return f"{mode[:3]}{count}x{_seq}"


async def trial(
    server: LocalServer,
    nc: Client,
    mode: str,
    count: int,
    duration: int,
    warmup: float,
    *,
    phases: str = "spread",
    profile_dir: Path | None = None,
    interval: int = 1,
) -> dict[str, Any]:
    started = time.time()
    load = round(os.getloadavg()[0], 2)
    try:
        if mode in WORKER_MODES:
            result = await worker_trial(
                server, nc, mode, count, duration, warmup, phases, profile_dir, interval
            )
        elif mode == "service":
            result = await service_trial(
                server, nc, count, duration, warmup, phases, profile_dir, interval
            )
        elif mode in SHARDED:
            instances, shards = SHARDED[mode]
            result = await service_trial(
                server,
                nc,
                count,
                duration,
                warmup,
                phases,
                profile_dir,
                interval,
                instances=instances,
                shards=shards,
            )
            result["mode"] = mode
        elif mode == "nats_schedules":
            result = await schedules_trial(server, nc, count, duration, warmup)
        else:
            raise ValueError(f"unknown mode {mode!r}")
    except Exception as exc:  # a trial that crashes is a failed trial, reported as such
        note(f"{mode} x{count}: failed: {type(exc).__name__}: {exc}")
        result = {
            "mode": mode,
            "count": count,
            "error": f"{type(exc).__name__}: {exc}",
            "missed": None,
        }
    result["wall_s"] = round(time.time() - started, 1)
    result["loadavg_1m"] = load
    lat = result.get("lateness") or {}
    note(
        f"{mode:>15} x{count:<6} p50 {lat.get('p50_ms')} p99 {lat.get('p99_ms')} "
        f"max {lat.get('max_ms')} ms, missed {result.get('missed')}, cpu {result.get('cpu')}"
        + (
            f", serve loop: stall <= {result['loop_stall_s']} s, "
            f"{result.get('loop_lag_samples_over_10ms')} samples > 10 ms"
            if "loop_stall_s" in result
            else ""
        )
    )
    return result


async def worker_trial(
    server: LocalServer,
    nc: Client,
    mode: str,
    count: int,
    duration: int,
    warmup: float,
    phases: str,
    profile_dir: Path | None,
    interval: int,
) -> dict[str, Any]:
    from _common import WorkerRun

    tag = _tag(mode, count)
    prefix = f"bench.{tag}"
    collector = FireCollector()
    sub = None
    if mode == "memory_publish":
        sub = await collector.subscribe(nc, f"{prefix}.>")
        await nc.flush()
    run = WorkerRun(
        {
            "role": "fire",
            "mode": mode,
            "count": count,
            "duration": duration,
            "warmup": warmup,
            "url": server.url,
            "bucket": f"{tag}-jobs",
            "prefix": prefix,
            "phases": phases,
            "interval": interval,
            "flush_timeout": 15 if interval == 1 else 600,
        }
    )
    await run.start()
    try:
        window = await run.next_line(timeout=300)
        w0, w1, pid = window["w0"], window["w1"], window["pid"]
        cpu = CpuWindow({"worker": pid, "nats_server": server.pid, "bench": os.getpid()})
        await sleep_until(w0)
        cpu.start()
        profiler = (
            Profiler(pid, duration, profile_dir / f"{mode}-{count}.txt")
            if profile_dir is not None
            else None
        )
        await sleep_until(w1)
        cpu.stop()
        result = await run.wait(timeout=120)
        result["cpu"] = cpu.result
        if profiler is not None:
            result["profile"] = await profiler.finish()
        if mode == "memory_publish":
            await asyncio.sleep(0.2)
            stats = fire_stats(collector.records, w0, w1, count)
            result["published"] = result.pop("fired", None)
            result["function_lateness"] = result.pop("lateness", None)
            result.update(stats)
        return result
    finally:
        await run.close()
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if mode == "jetstream":
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_key_value(f"{tag}-jobs")


async def service_trial(
    server: LocalServer,
    nc: Client,
    count: int,
    duration: int,
    warmup: float,
    phases: str,
    profile_dir: Path | None,
    interval: int = 1,
    *,
    instances: int = 1,
    shards: int = 1,
) -> dict[str, Any]:
    """`instances` serve processes; with `shards` > 1 the jobs are created once every
    instance leads its share of the shards, and CPU is the sum over the instances."""
    tag = _tag("service" if instances == 1 else f"sh{shards}x{instances}", count)
    prefix = f"bench.{tag}"
    env = serve_env(server.url, tag)
    env["NATS_CRON_SHARDS"] = str(shards)
    env["NATS_CRON_METRICS_PORT"] = "0"  # the loop-lag histogram; a free port, from its log
    collector = FireCollector()
    sub = await collector.subscribe(nc, f"{prefix}.>")
    await nc.flush()
    procs = [PROCS.add(ServeProcess(f"{tag}-i{n}", env)) for n in range(instances)]
    proc = procs[0]
    try:
        await asyncio.gather(*(p.await_log("leading: firing", timeout=60) for p in procs))
        ports = [metrics_port(await p.await_log("metrics and health on")) for p in procs]
        if instances > 1:
            await wait_spread(nc, shards, instances)
        anchor = math.floor(time.time()) - 10
        if phases == "aligned":
            docs = [every_doc(f"{prefix}.{i}", f"{interval}s", anchor) for i in range(count)]
        else:
            docs = spread_docs(prefix, count, interval, anchor)
        # Created while the instances lead, as through the API: each job's first slot
        # is its next one, so no catch-up burst distorts the window.
        fill_s = await fill_jobs(nc, env["NATS_CRON_JOBS_BUCKET"], docs)
        w0 = math.ceil(time.time() + warmup)
        w1 = w0 + duration
        pids = {f"serve{n}" if n else "serve": p.proc.pid for n, p in enumerate(procs)}
        cpu = CpuWindow({**pids, "nats_server": server.pid, "bench": os.getpid()})
        await sleep_until(w0)
        cpu.start()
        lags0 = [await scrape_buckets(port, LAG) for port in ports]
        kv0 = await kv_last_seq(nc, env["NATS_CRON_JOBS_BUCKET"])
        profiler = (
            Profiler(proc.proc.pid, duration, profile_dir / f"service-{count}.txt")
            if profile_dir is not None
            else None
        )
        await sleep_until(w1)
        cpu.stop()
        lags1 = [await scrape_buckets(port, LAG) for port in ports]
        kv1 = await kv_last_seq(nc, env["NATS_CRON_JOBS_BUCKET"])
        memory = proc_status(proc.proc.pid)
        await asyncio.sleep(1.0)  # stragglers of the window's last slots
        stats = fire_stats(collector.records, w0, w1, count)
        result: dict[str, Any] = {
            "mode": "service",
            "count": count,
            "interval_s": interval,
            "w0": w0,
            "w1": w1,
            "fill_s": round(fill_s, 2),
            **stats,
            "cpu": cpu.result,
            "rss_mb": memory.get("VmRSS"),
            "peak_rss_mb": memory.get("VmHWM"),
            "kv_writes": kv1 - kv0,
            "kv_writes_per_fire": round((kv1 - kv0) / max(1, stats["fired"]), 3),
            # The serve loop's own stalls in the window (its monitor samples every 50 ms):
            # tells lateness made in the instance from lateness made outside it.
            "loop_stall_s": _worst(stall_bound(b, a) for b, a in zip(lags0, lags1, strict=True)),
            "loop_lag_samples_over_10ms": _total(
                lag_samples_above(b, a, 0.01) for b, a in zip(lags0, lags1, strict=True)
            ),
        }
        if instances > 1:
            result["instances"], result["shards"] = instances, shards
            serve_cpu = [cpu.result.get(name) for name in pids]
            result["cpu_serve_total"] = round(sum(c or 0.0 for c in serve_cpu), 3)
        if profiler is not None:
            result["profile"] = await profiler.finish()
        errors = [ln for p in procs for ln in p.lines if ln.get("level") in ("error", "warning")]
        if errors:
            result["log_warnings"] = len(errors)
            result["first_warning"] = errors[0].get("msg")
            result["first_warning_after_w0_s"] = round(log_time(errors[0]) - w0, 3)
            result["lease_losses"] = sum(
                1 for ln in errors if str(ln.get("msg", "")).startswith("lost the lease")
            )
            losses = [ln for ln in errors if str(ln.get("msg", "")).startswith("lost the")]
            if losses:
                result["first_lease_loss"] = losses[0].get("msg")
        return result
    finally:
        for p in procs:
            p.stop()
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        await drop_service_state(nc, tag)


async def schedules_trial(
    server: LocalServer, nc: Client, count: int, duration: int, warmup: float
) -> dict[str, Any]:
    """nats-server message schedules: `count` schedules `@every 1s` in one stream.

    Observed on nats-server 2.15: `@every 1s` slots are whole seconds (all schedules fire
    together at the top of each second; the phase cannot be spread) and each produced
    message carries `Nats-Scheduler` (the schedule's subject) and `Nats-Schedule-Next`
    (the next slot, second resolution); so the slot it was produced for is Next - 1 s.
    Produced messages are stored in the stream, not sent to core subscribers; the
    stream republishes them to `out.<tag>.>` for the subscriber here.
    """
    tag = _tag("sched", count)
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
    collector = FireCollector()
    sub = await collector.subscribe(nc, f"out.{tag}.>")
    await nc.flush()
    try:
        t0 = time.time()
        pending = []
        for i in range(count):
            headers = {"Nats-Schedule": "@every 1s", "Nats-Schedule-Target": f"tgt.{tag}.{i}"}
            pending.append(await js.publish_async(f"sch.{tag}.{i}", b"", headers=headers))
        await asyncio.gather(*pending)
        setup = time.time() - t0
        w0 = math.ceil(time.time() + warmup)
        w1 = w0 + duration
        cpu = CpuWindow({"nats_server": server.pid, "bench": os.getpid()})
        await sleep_until(w0)
        cpu.start()
        await sleep_until(w1)
        cpu.stop()
        await asyncio.sleep(1.0)

        def scheduled_of(h: dict[str, str]) -> tuple[str, float]:
            nxt = datetime.fromisoformat(h["Nats-Schedule-Next"]).timestamp()
            return h["Nats-Scheduler"], nxt - 1

        stats = fire_stats(collector.records, w0, w1, count, scheduled_of)
        stored: list[float] = []
        for headers, _received in collector.records:
            with contextlib.suppress(KeyError, ValueError):
                slot = scheduled_of(headers)[1]
                if w0 <= slot < w1:
                    stored.append(_ns_time(headers["Nats-Time-Stamp"]) - slot)
        return {
            "mode": "nats_schedules",
            "count": count,
            "w0": w0,
            "w1": w1,
            "setup_s": round(setup, 3),
            **stats,
            "stored_lateness": summary(stored),
            "cpu": cpu.result,
            "phases": "aligned (server: whole seconds)",
        }
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)


def _ns_time(text: str) -> float:
    """An RFC 3339 UTC time with up to nanoseconds (`...:51.000906017Z`) as a timestamp."""
    main, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(main + "+00:00").timestamp() + float("0." + (frac or "0"))


def _worst(values: Iterable[float | None]) -> float | None:
    found = list(values)
    return None if None in found else max((v for v in found if v is not None), default=None)


def _total(values: Iterable[int | None]) -> int | None:
    found = list(values)
    return None if None in found else sum(v for v in found if v is not None)
