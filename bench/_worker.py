"""Child process of the benchmarks (not run by hand): `python bench/_worker.py '<json>'`.

Roles (the JSON's "role"):
- fire: an APScheduler 3 scheduler with `count` jobs every `interval` s, phases spread evenly
  over the period (or all at 0 with "phases": "aligned"). Modes:
    memory          AsyncIOScheduler + MemoryJobStore (the reference)
    background      BackgroundScheduler + MemoryJobStore + its default thread pool
    jetstream       AsyncIOScheduler + JetStreamJobStore on a shared connection (plugin mode)
    memory_publish  like memory, but each run publishes a message with nats-cron's headers
                    (the lateness is then measured by the parent at a subscriber)
  The job function records when it started; the scheduled time of each run comes from
  EVENT_JOB_SUBMITTED (paired in order: coalesce=True, max_instances=1, no grace limit, so
  each submission is exactly one call). Prints {"event": "window", ...} once the measuring
  window [w0, w1) (whole seconds, after the warm-up) is known, then the result.
- burst: `count` jobs on one slot (`CronTrigger(second="*/20")`, AsyncIOScheduler +
  MemoryJobStore), each run publishing one message with nats-cron's headers as
  memory_publish does; prints {"event": "armed", "slot": ...} and runs until killed
  (bench/burst.py observes the arrivals).
- store_open: time `await JetStreamJobStore(bucket, nc).open()` (decode + index) and, with
  "cprofile": true, the top functions of that call.
- raw_watch: the baseline of a load: a KV watch that receives every key of the bucket,
  decoding nothing.
- echo: a request/reply echo responder ("micro": true: a nats.micro endpoint) until killed.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import json
import math
import os
import pstats
import resource
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats
from _common import summary  # type: ignore[import-not-found]

T_IMPORTED = time.time()

# Per job index: scheduled times (from the submission events) and start times of the calls.
SUBMITTED: list[list[float]] = []
STARTED: list[list[float]] = []
PENDING: list[list[float]] = []  # memory_publish: slots not yet published
NC: Any = None
PREFIX = "bench"


def out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def rusage_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_mb() -> dict[str, float]:
    res: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                res[key] = round(int(value.split()[0]) / 1024, 2)
    return res


# --- the job functions (module level: the JetStream store stores them by reference) ----------


async def tick(i: int) -> None:
    STARTED[i].append(time.time())


def tick_sync(i: int) -> None:
    STARTED[i].append(time.time())


async def tick_publish(i: int) -> None:
    STARTED[i].append(time.time())
    slot = PENDING[i].pop(0)
    ms = round(slot * 1000)
    subject = f"{PREFIX}.{i}"
    scheduled = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    headers = {
        "Nats-Msg-Id": f"{subject}:{ms}",
        "Nats-Cron-Job": subject,
        "Nats-Cron-Scheduled": scheduled.replace("+00:00", "Z"),
    }
    await NC.publish(subject, b"", headers=headers)


# --- fire ---------------------------------------------------------------------------------------


async def fire(cfg: dict[str, Any]) -> dict[str, Any]:
    global NC, PREFIX
    from apscheduler.events import EVENT_JOB_SUBMITTED
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.interval import IntervalTrigger

    mode: str = cfg["mode"]
    n: int = cfg["count"]
    duration: int = cfg["duration"]
    warmup: float = cfg["warmup"]
    interval: int = cfg.get("interval", 1)
    aligned = cfg.get("phases") == "aligned"
    PREFIX = cfg.get("prefix", "bench")
    SUBMITTED.extend([] for _ in range(n))
    STARTED.extend([] for _ in range(n))
    PENDING.extend([] for _ in range(n))
    lock = threading.Lock()

    store = None
    if mode in ("jetstream", "memory_publish"):
        NC = await nats.connect(cfg["url"], pending_size=64 * 1024 * 1024)
    if mode == "background":
        scheduler: Any = BackgroundScheduler(timezone=UTC)
        func: Any = tick_sync
    else:
        scheduler = AsyncIOScheduler(timezone=UTC)
        func = tick_publish if mode == "memory_publish" else tick
    if mode == "jetstream":
        from nats_apscheduler.store import JetStreamJobStore

        store = JetStreamJobStore(bucket=cfg["bucket"], nc=NC, functions=[tick])
        await store.open()
        scheduler.add_jobstore(store, "default")

    def on_submitted(event: Any) -> None:
        i = int(event.job_id[1:])
        slots = [t.timestamp() for t in event.scheduled_run_times]
        with lock:
            SUBMITTED[i].extend(slots)
            if mode == "memory_publish":
                PENDING[i].extend(slots)

    scheduler.add_listener(on_submitted, EVENT_JOB_SUBMITTED)
    anchor = math.floor(time.time()) - 10
    period_ms = interval * 1000
    for i in range(n):
        offset = 0 if aligned else i * period_ms // n
        start = datetime.fromtimestamp(anchor + offset / 1000, UTC)
        scheduler.add_job(
            func,
            IntervalTrigger(seconds=interval, start_date=start, timezone=UTC),
            args=[i],
            id=f"j{i}",
            coalesce=True,
            misfire_grace_time=None,
            max_instances=1,
        )
    t_start = time.time()
    scheduler.start()
    flush_s: float | None = None
    if store is not None:
        # The initial creates reach KV. Bounded: under a sustained write rate aflush()
        # waits for an empty queue, which may never come (reported as flush_timed_out).
        try:
            await asyncio.wait_for(store.aflush(), cfg.get("flush_timeout", 15))
            flush_s = round(time.time() - t_start, 3)
        except TimeoutError:
            flush_s = None
    t_ready = time.time()
    w0 = math.ceil(max(t_ready, t_start + warmup))
    w1 = w0 + duration
    out({"event": "window", "w0": w0, "w1": w1, "pid": os.getpid()})
    await asyncio.sleep(max(0.0, w0 - time.time()))
    gc_pauses: list[tuple[int, float]] = []
    gc_started: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_started.append(time.perf_counter())
        elif gc_started:
            gc_pauses.append((info["generation"], time.perf_counter() - gc_started.pop()))

    gc.callbacks.append(on_gc)
    c0, m0 = rusage_cpu(), time.monotonic()
    kv0 = await _kv_seq(store, cfg) if store is not None else None
    await asyncio.sleep(max(0.0, w1 - time.time()))
    c1, m1 = rusage_cpu(), time.monotonic()
    gc.callbacks.remove(on_gc)
    kv1 = await _kv_seq(store, cfg) if store is not None else None
    memory = rss_mb()
    await asyncio.sleep(cfg.get("settle", 1.0))
    if mode == "background":
        scheduler.shutdown(wait=True)
    else:
        scheduler.shutdown(wait=False)
        await asyncio.sleep(0)
    if store is not None:
        await store.aclose()
    if NC is not None:
        await NC.flush()
        await NC.close()

    late: list[float] = []
    fired = 0
    with lock:
        for i in range(n):
            seen = set()
            for slot, began in zip(SUBMITTED[i], STARTED[i], strict=False):
                if w0 <= slot < w1:
                    seen.add(round(slot * 1000))
                    late.append(began - slot)
            fired += len(seen)
    fires_in_window = fired
    result: dict[str, Any] = {
        "event": "result",
        "mode": mode,
        "count": n,
        "interval_s": interval,
        "w0": w0,
        "w1": w1,
        "setup_s": round(t_ready - t_start, 3),
        **(
            {"initial_flush_s": flush_s, "flush_timed_out": flush_s is None}
            if store is not None
            else {}
        ),
        "cpu_s_per_s": round((c1 - c0) / (m1 - m0), 3),
        "rss_mb": memory.get("VmRSS"),
        "peak_rss_mb": memory.get("VmHWM"),
        "gc": {
            "collections": len(gc_pauses),
            "full_collections": sum(1 for g, _ in gc_pauses if g == 2),
            "total_ms": round(sum(p for _, p in gc_pauses) * 1000, 1),
            "max_pause_ms": round(max((p for _, p in gc_pauses), default=0) * 1000, 2),
        },
    }
    if interval == 1:
        expected = n * duration
        result.update(
            expected=expected,
            fired=fires_in_window,
            missed=max(0, expected - fires_in_window),
            lateness=summary(late),
        )
    if kv0 is not None and kv1 is not None:
        result["kv_writes"] = kv1 - kv0
        result["kv_writes_per_fire"] = round((kv1 - kv0) / max(1, fires_in_window), 3)
    return result


async def burst(cfg: dict[str, Any]) -> dict[str, Any]:
    """`count` jobs on one cron slot: AsyncIOScheduler + MemoryJobStore, each job
    `CronTrigger(second="*/<period>")` publishing one message with nats-cron's headers
    (`tick_publish`). All jobs are added before the scheduler starts; once it runs, the
    measured slot is the first that begins `margin` s later: printed as
    {"event": "armed", "slot": ..., "pid": ...}. Runs until killed by the parent (which
    reads CPU and RSS from /proc and the arrivals at its own subscriber).
    """
    global NC, PREFIX
    from apscheduler.events import EVENT_JOB_SUBMITTED
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.cron import CronTrigger

    n: int = cfg["count"]
    period: int = cfg.get("period", 20)
    PREFIX = cfg["prefix"]
    SUBMITTED.extend([] for _ in range(n))
    STARTED.extend([] for _ in range(n))
    PENDING.extend([] for _ in range(n))
    NC = await nats.connect(cfg["url"], pending_size=256 * 1024 * 1024)
    scheduler = AsyncIOScheduler(timezone=UTC)

    def on_submitted(event: Any) -> None:
        PENDING[int(event.job_id[1:])].extend(t.timestamp() for t in event.scheduled_run_times)

    scheduler.add_listener(on_submitted, EVENT_JOB_SUBMITTED)
    t0 = time.time()
    trigger = CronTrigger(second=f"*/{period}", timezone=UTC)
    for i in range(n):
        # No grace limit (APScheduler's default of 1 s would skip the end of a large herd),
        # one run at a time, missed runs coalesced: as the `fire` role.
        scheduler.add_job(
            tick_publish,
            trigger,
            args=[i],
            id=f"j{i}",
            coalesce=True,
            misfire_grace_time=None,
            max_instances=1,
        )
    scheduler.start()
    ready = time.time()
    slot = math.ceil((ready + cfg.get("margin", 3.0)) / period) * period
    out(
        {
            "event": "armed",
            "slot": slot,
            "setup_s": round(ready - t0, 3),
            "pid": os.getpid(),
        }
    )
    await asyncio.Event().wait()  # until killed
    return {}


async def _kv_seq(store: Any, cfg: dict[str, Any]) -> int | None:
    try:  # an overloaded loop may see this request time out: then no figure
        info = await NC.jetstream().stream_info(f"KV_{cfg['bucket']}")
    except Exception:
        return None
    return int(info.state.last_seq)


# --- startup roles ------------------------------------------------------------------------------


async def store_open(cfg: dict[str, Any]) -> dict[str, Any]:
    from nats_apscheduler.store import JetStreamJobStore

    t0 = time.time()
    nc = await nats.connect(cfg["url"], pending_size=256 * 1024 * 1024)
    t1 = time.time()
    store = JetStreamJobStore(bucket=cfg["bucket"], nc=nc, timeout=600)
    profile = cProfile.Profile() if cfg.get("cprofile") else None
    gc_before = gc.get_count()
    collections_before = sum(s["collections"] for s in gc.get_stats())
    if cfg.get("disable_gc"):
        gc.disable()
    if profile is not None:
        profile.enable()
    await store.open()
    if profile is not None:
        profile.disable()
    t2 = time.time()
    gc.enable()
    collections = sum(s["collections"] for s in gc.get_stats()) - collections_before
    del gc_before
    jobs = len(store.get_all_jobs())
    memory = rss_mb()
    await store.aclose()
    await nc.close()
    result: dict[str, Any] = {
        "event": "result",
        "jobs": jobs,
        "import_s": round(T_IMPORTED - cfg["spawned_at"], 3),
        "connect_s": round(t1 - t0, 3),
        "load_s": round(t2 - t1, 3),
        "spawn_to_loaded_s": round(t2 - cfg["spawned_at"], 3),
        "rss_mb": memory.get("VmRSS"),
        "gc_disabled": bool(cfg.get("disable_gc")),
        "gc_collections_during_load": collections,
    }
    if profile is not None:
        result["cprofile"] = top_functions(profile)
    return result


def top_functions(profile: cProfile.Profile, n: int = 25) -> dict[str, Any]:
    stats = pstats.Stats(profile)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = []
    for (path, _line, name), (_cc, calls, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((name, Path(path).name, calls, tt, ct))
    by_self = sorted(rows, key=lambda r: r[3], reverse=True)[:n]
    by_cum = sorted(rows, key=lambda r: r[4], reverse=True)[:n]

    def fmt(r: tuple[Any, ...]) -> list[Any]:
        return [f"{r[0]} ({r[1]})", r[2], round(r[3], 3), round(r[4], 3)]

    return {
        "total_s": round(total, 3),
        "columns": ["function", "calls", "self_s", "cumulative_s"],
        "by_self": [fmt(r) for r in by_self],
        "by_cumulative": [fmt(r) for r in by_cum],
    }


async def raw_watch(cfg: dict[str, Any]) -> dict[str, Any]:
    t0 = time.time()
    nc = await nats.connect(cfg["url"], pending_size=256 * 1024 * 1024)
    t1 = time.time()
    kv = await nc.jetstream().key_value(cfg["bucket"])
    keys = 0
    nbytes = 0
    watcher = await kv.watchall()
    async for entry in watcher:
        if entry is None:
            break
        keys += 1
        nbytes += len(entry.value or b"")
    t2 = time.time()
    await watcher.stop()
    await nc.close()
    return {
        "event": "result",
        "keys": keys,
        "bytes": nbytes,
        "import_s": round(T_IMPORTED - cfg["spawned_at"], 3),
        "connect_s": round(t1 - t0, 3),
        "load_s": round(t2 - t1, 3),
        "spawn_to_loaded_s": round(t2 - cfg["spawned_at"], 3),
    }


async def echo(cfg: dict[str, Any]) -> dict[str, Any]:
    nc = await nats.connect(cfg["url"])
    if cfg.get("micro"):
        from nats.micro import add_service
        from nats.micro.request import Request
        from nats.micro.service import EndpointConfig, ServiceConfig

        service = await add_service(
            nc, ServiceConfig(name="bench-echo", version="0.0.1", queue_group="q")
        )

        async def handler(request: Request) -> None:
            await request.respond(request.data)

        await service.add_endpoint(
            EndpointConfig(name="echo", subject=cfg["subject"], handler=handler)
        )
    else:

        async def cb(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(cfg["subject"], queue="q", cb=cb)
    await nc.flush()
    out({"event": "ready"})
    await asyncio.Event().wait()  # until killed
    return {}


async def cron(cfg: dict[str, Any]) -> dict[str, Any]:
    """A NatsCron instance in this process, cProfiled while it fires `count` jobs every 1 s.

    Reports the functions that dominate and, per fire, how often the key ones ran (the fires
    are the firer's own count of fires written), so that "what happens per fire" is
    counted, not guessed.
    """
    from _common import spread_docs  # type: ignore[import-not-found]

    from nats_apscheduler.server import NatsCron
    from nats_apscheduler.settings import Connection, Settings

    name = cfg["name"]
    settings = Settings(
        connection=Connection(url=cfg["url"]),
        instance_id=f"{name}-profiled",
        jobs_bucket=f"{name}-jobs",
        leader_bucket=f"{name}-leader",
        events_stream=f"H_{name}",
        events_prefix=f"ev.{name}",
    )
    nc = await nats.connect(cfg["url"], pending_size=64 * 1024 * 1024)
    instance = NatsCron(settings, nc=nc)
    await instance.start()
    while not instance.election.is_leader_now():
        await asyncio.sleep(0.02)
    docs = spread_docs(f"bench.{name}", cfg["count"])
    for at in range(0, len(docs), 2000):
        await asyncio.gather(*(instance.jobs.create(d) for d in docs[at : at + 2000]))
    await asyncio.sleep(cfg["warmup"])
    js = nc.jetstream()

    async def seqs() -> tuple[int, int, int]:
        kv = await js.stream_info(f"KV_{settings.jobs_bucket}")
        hist = await js.stream_info(settings.events_stream)
        lead = await js.stream_info(f"KV_{settings.leader_bucket}")
        return int(kv.state.last_seq), int(hist.state.last_seq), int(lead.state.last_seq)

    kv0, h0, l0 = await seqs()
    written0 = instance.metrics.fired_total()
    st0 = dict(nc.stats)
    profile = cProfile.Profile()
    c0, m0 = rusage_cpu(), time.monotonic()
    profile.enable()
    await asyncio.sleep(cfg["duration"])
    profile.disable()
    cpu = (rusage_cpu() - c0) / (time.monotonic() - m0)
    st1 = dict(nc.stats)
    fires = instance.metrics.fired_total() - written0
    kv1, h1, l1 = await seqs()
    kv_writes, history, leader_writes = kv1 - kv0, h1 - h0, l1 - l0
    sent_msgs, recv_msgs = st1["out_msgs"] - st0["out_msgs"], st1["in_msgs"] - st0["in_msgs"]
    sent_bytes = st1["out_bytes"] - st0["out_bytes"]
    recv_bytes = st1["in_bytes"] - st0["in_bytes"]
    await instance.stop()
    await nc.close()
    stats = pstats.Stats(profile)
    # Exact counts of synchronous functions (cProfile counts every resumption of a
    # coroutine as a call, so async functions are left out; the NATS message and KV
    # write counts below come from the connection's and the stream's own counters).
    watched = {
        ("term.py", "process"): "slices (Term.process)",
        ("fire.py", "write"): "slices written (Firer.write)",
        ("agenda.py", "resolve"): "slot resolutions",
        ("codec.py", "encode_job"): "encode_job: whole record to JSON",
        ("store.py", "update_job"): "JetStreamJobStore.update_job",
        ("store.py", "_on_entry"): "JetStreamJobStore._on_entry (watch entry)",
        ("encoder.py", "iterencode"): "json encodes",
        ("fire.py", "rfc3339"): "rfc3339",
        ("fire.py", "ulid"): "ulid bodies",
        ("~", "<method 'isoformat' of 'datetime.datetime' objects>"): "datetime.isoformat",
        ("_logger.py", "bind"): "loguru Logger.bind",
        ("_logger.py", "_log"): "loguru records (emitted or not)",
        ("observe.py", "on_fire"): "Metrics.on_fire",
        ("base_events.py", "create_task"): "loop.create_task",
        ("~", "<method 'send' of '_socket.socket' objects>"): "socket send syscalls",
        ("~", "<method 'recv' of '_socket.socket' objects>"): "socket recv syscalls",
        ("msg.py", "_from_reply"): "JetStream reply-subject metadata parses",
        ("asyncio.py", "wakeup"): "scheduler wake-ups",
    }
    counts: dict[str, int] = {}
    for (path, _line, func), (_cc, calls, *_rest) in stats.stats.items():  # type: ignore[attr-defined]
        label = watched.get((Path(path).name, func))
        if label is not None:
            counts[label] = counts.get(label, 0) + calls
    per_fire = {
        label: round(calls / max(1, fires), 3)
        for label, calls in sorted(counts.items(), key=lambda kv: -kv[1])
    }
    return {
        "event": "result",
        "count": cfg["count"],
        "fires": fires,
        "fires_per_s": round(fires / cfg["duration"], 1),
        "cpu_s_per_s_under_cprofile": round(cpu, 3),
        "per_fire": {
            "messages_sent": round(sent_msgs / max(1, fires), 3),
            "messages_received": round(recv_msgs / max(1, fires), 3),
            "bytes_sent": round(sent_bytes / max(1, fires), 1),
            "bytes_received": round(recv_bytes / max(1, fires), 1),
            "kv_writes": round(kv_writes / max(1, fires), 3),
            "progress_mark_writes": round(leader_writes / max(1, fires), 4),
            "history_records": round(history / max(1, fires), 3),
        },
        "calls_per_fire": per_fire,
        "cprofile": top_functions(profile, 30),
    }


ROLES = {
    "fire": fire,
    "burst": burst,
    "store_open": store_open,
    "raw_watch": raw_watch,
    "echo": echo,
    "cron": cron,
}


async def run_role(cfg: dict[str, Any]) -> None:
    result = await ROLES[cfg.get("role", "fire")](cfg)
    out(result)
    sys.stderr.flush()
    # Exit now: cancelling thousands of pending job tasks (an overloaded scheduler) at
    # the end of asyncio.run() would only log their cancellations.
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(run_role(json.loads(sys.argv[1])))
