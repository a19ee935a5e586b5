"""Benchmark: request-mode jobs against a replying worker, some of it slow, next to the same
jobs in publish mode (the baseline, same run).

    python bench/delivery.py                  # full: 1,000 jobs, 20 s windows, 2 repeats
    python bench/delivery.py --quick          # smoke: 200 jobs, 5 s, 1 repeat

`--jobs` jobs (1,000) every 1 s, phases spread over the second, run by a real `nats-cron
serve` process; the worker is another process (bench/_responder.py) subscribed to all of
their subjects, which stamps every message on arrival and answers each request: at once,
or after `--slow-s` (2 s) for every `--slow-every`-th job (10: 10 % of them). Modes:
- publish: `delivery` absent (a core publish); the worker stamps and does not answer;
- request: `{"mode": "request", "timeout": "5s"}`; the worker answers, so a slow job has
  a run in flight for 2 s and 1,000 jobs keep ~200 requests in flight.

Lateness is the arrival time at an observer minus the slot (`Nats-Msg-Id`'s `:<ms>`), over
whole seconds after a warm-up, for the jobs that are not slow (`others`) and for all. The
observer is burst.py's raw-socket subscriber (bench/_rawsub.py), a third process that only
stamps, so that neither the worker's replying nor nats-py's per-message cost blurs the
figure (the worker's own arrival times are reported too, `worker_lateness_others`). CPU is
the `serve` process's over the window; `cpu_per_1000_fires` is its CPU seconds per 1,000
fires (a request's reply and outcome event included). The outcomes are scraped from the
service's /metrics at the end of each run. The modes run back to back per repeat; repeats
interleave. Prints one JSON object: per mode the runs and the medians over repeats, and
the ratios request/publish. Target (README): request mode keeps the others' p99 within the
publish-mode target (5 ms at 1,000 fires/s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

# bench/ (its helpers) and the repository (nats_apscheduler, tests.helpers)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # type: ignore[import-not-found]
    BENCH,
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
    summary,
)
from _rawsub import RawSubscriber  # type: ignore[import-not-found]
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.cluster import ServeProcess

MODES = ("publish", "request")
P99_TARGET_MS = 5.0  # the publish-mode target of the README (lateness at 1,000 fires/s)
_seq = 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """`nats_cron_fires_total` by outcome, and the runs in flight, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nats_cron_fires_total":
                key = sample.labels.get("outcome", "?")
                out[key] = out.get(key, 0) + sample.value
            elif sample.name == "nats_cron_runs_in_flight":
                out["in_flight_at_end"] = sample.value
    return out


async def run(server: LocalServer, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    global _seq
    _seq += 1
    tag = f"dlv{_seq}{mode[:3]}"
    prefix = f"bench.{tag}"
    port = free_port()
    env = {
        **serve_env(server.url, tag),
        "NATS_CRON_METRICS_PORT": str(port),
        "NATS_CRON_METRICS_HOST": "127.0.0.1",
    }
    records_file = Path(tempfile.mkstemp(prefix="nats-cron-delivery-", suffix=".json")[1])
    config = {
        "url": server.url,
        "prefix": prefix,
        "slow_every": args.slow_every,
        "slow_s": args.slow_s,
        "out": str(records_file),
    }
    responder = PROCS.add(
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH / "_responder.py"),
            json.dumps(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
    )
    assert responder.stdout is not None and responder.stdin is not None
    await asyncio.wait_for(responder.stdout.readline(), 30)  # {"ready": true}
    fd, observed = tempfile.mkstemp(prefix=f"delivery-{tag}-", suffix=".txt", dir=server.dir)
    os.close(fd)
    observer = RawSubscriber(
        server.url, f"{prefix}.>", Path(observed), register=PROCS.add, unregister=PROCS.items.remove
    )
    await observer.start()
    proc = PROCS.add(ServeProcess(f"{tag}-leader", env))
    nc = await connect(server.url)
    try:
        await proc.await_log("leading: firing", timeout=60)
        anchor = math.floor(time.time()) - 10
        docs = spread_docs(prefix, args.jobs, 1, anchor)
        if mode == "request":
            for doc in docs:
                doc["delivery"] = {"mode": "request", "timeout": "5s"}
        fill_s = await fill_jobs(nc, env["NATS_CRON_JOBS_BUCKET"], docs)
        w0 = math.ceil(time.time() + args.warmup)
        w1 = w0 + args.duration
        cpu = CpuWindow({"serve": proc.proc.pid, "nats_server": server.pid})
        await sleep_until(w0)
        before = await asyncio.to_thread(scrape, port)
        cpu.start()
        await sleep_until(w1)
        cpu.stop()
        memory = proc_status(proc.proc.pid)
        await asyncio.sleep(args.slow_s + 1.0)  # the last slow replies of the window
        after = await asyncio.to_thread(scrape, port)
        # Quiet first: the observer finishes once its socket goes quiet, which a firing
        # service never lets happen.
        await asyncio.to_thread(proc.stop)
        responder.stdin.write(b"stop\n")
        await responder.stdin.drain()
        done = json.loads(await asyncio.wait_for(responder.stdout.readline(), 60))
        records = json.loads(records_file.read_text())
        raw = await observer.stop()
    finally:
        await observer.close()
        proc.stop()
        with contextlib.suppress(ProcessLookupError):
            responder.kill()
        with contextlib.suppress(Exception):
            await responder.wait()
        records_file.unlink(missing_ok=True)
        await drop_service_state(nc, tag)
        await nc.close()

    def is_slow(index: int) -> bool:
        return bool(args.slow_every) and index % args.slow_every == 0

    seen = [
        (int(subject.rsplit(".", 1)[1]), slot / 1000, arrival)
        for subject, slot, arrival in raw["records"]
        if slot is not None
    ]
    window = [(i, s, r) for i, s, r in seen if w0 <= s < w1]
    slots = {(i, round(s * 1000)) for i, s, _ in window}
    expected = args.jobs * args.duration
    others = [r - s for i, s, r in window if not is_slow(i)]
    fires = len(window)
    at_worker = [r - s for i, s, r in records if w0 <= s < w1 and not is_slow(i)]
    serve_cpu = cpu.result.get("serve")
    outcomes = {
        k: round(after.get(k, 0) - before.get(k, 0)) for k in after if k != "in_flight_at_end"
    }
    result = {
        "mode": mode,
        "jobs": args.jobs,
        "w0": w0,
        "fill_s": round(fill_s, 2),
        "expected": expected,
        "fired": len(slots),
        "missed": max(0, expected - len(slots)),
        "duplicates": fires - len(slots),
        "lateness_others": summary(others),
        "lateness_all": summary(r - s for _, s, r in window),
        "worker_lateness_others": summary(at_worker),
        "cpu": cpu.result,
        "cpu_per_1000_fires": (
            round(serve_cpu * args.duration / fires * 1000, 3) if serve_cpu and fires else None
        ),
        "rss_mb": memory.get("VmRSS"),
        "outcomes_in_window_and_after": outcomes,
        "responder_cpu_s": done.get("cpu_s"),
        "log_warnings": [
            ln.get("msg") for ln in proc.lines if ln.get("level") in ("warning", "error")
        ][:5],
    }
    lat = result["lateness_others"]
    note(
        f"{mode:>8} x{args.jobs}: others p50 {lat['p50_ms']} p99 {lat['p99_ms']} max "
        f"{lat['max_ms']} ms, missed {result['missed']}, serve cpu {serve_cpu} "
        f"({result['cpu_per_1000_fires']} s/1000 fires), outcomes {outcomes}"
    )
    return result


async def main(args: argparse.Namespace) -> None:
    server = LocalServer().start()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    try:
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(await run(server, mode, args))
    finally:
        server.stop()
    medians = {
        mode: {
            "others_p50_ms": med(r["lateness_others"]["p50_ms"] for r in rs),
            "others_p99_ms": med(r["lateness_others"]["p99_ms"] for r in rs),
            "others_max_ms": med(r["lateness_others"]["max_ms"] for r in rs),
            "all_p99_ms": med(r["lateness_all"]["p99_ms"] for r in rs),
            "missed": med(r["missed"] for r in rs),
            "serve_cpu_cores": med((r["cpu"] or {}).get("serve") for r in rs),
            "cpu_per_1000_fires": med(r["cpu_per_1000_fires"] for r in rs),
        }
        for mode, rs in runs.items()
    }
    request, publish = medians["request"], medians["publish"]
    report = {
        "benchmark": "delivery",
        "config": {
            "jobs": args.jobs,
            "slow_every": args.slow_every,
            "slow_s": args.slow_s,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "repeats": args.repeats,
            "quick": args.quick,
        },
        "machine": machine(),
        "median": medians,
        "ratio_request_to_publish": {
            key: ratio(request.get(key), publish.get(key))
            for key in ("others_p50_ms", "others_p99_ms", "cpu_per_1000_fires")
        },
        "target": {
            "others_p99_ms_max": P99_TARGET_MS,
            "met": request["others_p99_ms"] is not None
            and request["others_p99_ms"] <= P99_TARGET_MS,
        },
        "runs": runs,
    }
    emit(report)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 jobs, 5 s, once")
    parser.add_argument("--jobs", type=int, help="jobs every 1 s (1000)")
    parser.add_argument("--slow-every", type=int, default=10, help="every n-th job is slow")
    parser.add_argument("--slow-s", type=float, default=2.0, help="the slow jobs' reply delay")
    parser.add_argument("--duration", type=int, help="seconds measured per run (20)")
    parser.add_argument("--warmup", type=float, help="seconds before the window (4)")
    parser.add_argument("--repeats", type=int, help="runs per mode, interleaved (2)")
    args = parser.parse_args()
    args.jobs = args.jobs or (200 if args.quick else 1000)
    args.duration = args.duration or (5 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 4.0)
    args.repeats = args.repeats or (1 if args.quick else 2)
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
