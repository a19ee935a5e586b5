"""Shared helpers of the benchmarks in bench/ (not a benchmark itself).

- a local nats-server (`LocalServer`) whose data directory is removed afterwards;
- statistics (`summary`: p50/p99/max in ms) and medians of repeats;
- /proc readers: CPU seconds and RSS of any process;
- job documents with evenly spread phases and a fast way to store many of them
  (`fill_jobs`: the service's own `JobManager` + `JetStreamJobStore`, pipelined);
- `FireCollector`: a core subscriber that records every fire with its receive time;
- `Profiler`: py-spy (if installed) attached to a child process, summarised per function;
- `Procs`: every child process a benchmark starts, stopped on exit whatever happens.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import nats  # noqa: E402
import nats.js.errors  # noqa: E402
from nats.aio.client import Client  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402

from nats_apscheduler.embedded import EmbeddedNatsServer  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- statistics ---------------------------------------------------------------------------


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of an already sorted sequence."""
    if not sorted_xs:
        return float("nan")
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = (len(sorted_xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summary(seconds: Iterable[float]) -> dict[str, Any]:
    """n, p50/p99/max (and mean) of durations given in seconds, reported in ms."""
    xs = sorted(seconds)
    if not xs:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "n": len(xs),
        "p50_ms": round(percentile(xs, 50) * 1000, 3),
        "p99_ms": round(percentile(xs, 99) * 1000, 3),
        "max_ms": round(xs[-1] * 1000, 3),
    }


def med(values: Iterable[float | None]) -> float | None:
    xs = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return round(statistics.median(xs), 4) if xs else None


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def emit(report: dict[str, Any]) -> None:
    """The one JSON object a benchmark prints on stdout (with the code measured at the end:
    compare with `machine` to see whether the package changed during the run)."""
    report.setdefault("code_at_end", code_version())
    print(json.dumps(report, indent=2, default=str), flush=True)


def note(*parts: Any) -> None:
    """Progress on stderr (stdout carries only the JSON report)."""
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


# --- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MB."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = round(int(value.split()[0]) / 1024, 2)
    except OSError:
        pass
    return out


class CpuWindow:
    """CPU seconds used by some processes between `start()` and `stop()`, per wall second."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0 = 0.0
        self._c0: dict[str, float | None] = {}
        self.result: dict[str, float | None] = {}

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._c0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float | None]:
        wall = time.monotonic() - self._t0
        for name, pid in self.pids.items():
            c1, c0 = cpu_seconds(pid), self._c0.get(name)
            self.result[name] = None if c1 is None or c0 is None else round((c1 - c0) / wall, 3)
        return self.result


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "loadavg_1m_at_start": round(load[0], 2),
        "python": sys.version.split()[0],
        **code_version(),
    }


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the package had uncommitted changes."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "git_head": git("rev-parse", "--short", "HEAD") or None,
        "package_modified": bool(git("status", "--porcelain", "--", "nats_apscheduler", "cli")),
    }


# --- child processes ----------------------------------------------------------------------------


class Procs:
    """Every child a benchmark starts; `stop_all()` runs on exit and on SIGTERM too."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        atexit.register(self.stop_all)
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, *_: Any) -> None:
        self.stop_all()
        sys.exit(143)

    def add(self, item: Any) -> Any:
        self.items.append(item)
        return item

    def stop_all(self) -> None:
        while self.items:
            item = self.items.pop()
            with contextlib.suppress(Exception):
                stop_item(item)


def stop_item(item: Any) -> None:
    if isinstance(item, subprocess.Popen):
        if item.poll() is None:
            item.terminate()
            try:
                item.wait(10)
            except subprocess.TimeoutExpired:
                item.kill()
                item.wait()
    elif isinstance(item, asyncio.subprocess.Process):
        if item.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                item.kill()
    else:
        item.stop()


PROCS = Procs()


class LocalServer:
    """A nats-server -js on a free loopback port, its data in a temporary directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nats-cron-bench-"))
        self.server = EmbeddedNatsServer(self.dir / "js")

    def start(self) -> LocalServer:
        self.server.start()
        PROCS.add(self)
        return self

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int:
        assert self.server.process is not None
        return self.server.process.pid

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def serve_env(url: str, name: str, log_level: str = "info") -> dict[str, str]:
    """Environment of a `nats-cron serve` child with its own buckets and stream."""
    return {
        "NATS_URL": url,
        "NATS_CRON_JOBS_BUCKET": f"{name}-jobs",
        "NATS_CRON_LEADER_BUCKET": f"{name}-leader",
        "NATS_CRON_EVENTS_STREAM": f"H_{name}",
        "NATS_CRON_EVENTS_PREFIX": f"ev.{name}",
        "LOG_LEVEL": log_level,
    }


async def drop_service_state(nc: Client, name: str) -> None:
    """Delete the buckets and history stream of a finished run (keeps the server small)."""
    js = nc.jetstream()
    for bucket in (f"{name}-jobs", f"{name}-leader"):
        with contextlib.suppress(Exception):
            await js.delete_key_value(bucket)
    with contextlib.suppress(Exception):
        await js.delete_stream(f"H_{name}")


def log_time(line: dict[str, Any]) -> float:
    """The wall-clock time a serve process stamped on one of its JSON log lines."""
    return datetime.fromisoformat(line["time"]).timestamp()


# --- job documents -----------------------------------------------------------------------------


def phase_ms(i: int, n: int, period_ms: int = 1000) -> int:
    """Job i of n: its offset in the period, evenly spread, whole milliseconds."""
    return i * period_ms // n


def rfc3339_ms(ts: float) -> str:
    dt = datetime.fromtimestamp(round(ts * 1000) / 1000, UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def every_doc(subject: str, every: str, start_ts: float | None = None) -> dict[str, Any]:
    schedule: dict[str, Any] = {"every": every}
    if start_ts is not None:
        schedule["start"] = rfc3339_ms(start_ts)
    return {"target": {"subject": subject}, "schedule": schedule}


def spread_docs(prefix: str, n: int, every_s: int = 1, anchor: float | None = None) -> list[dict]:
    """n jobs `every <every_s>s` on subjects `<prefix>.<i>`, phases spread over the period."""
    base = math.floor(time.time()) - 10 if anchor is None else anchor
    period_ms = every_s * 1000
    return [
        every_doc(f"{prefix}.{i}", f"{every_s}s", base + phase_ms(i, n, period_ms) / 1000)
        for i in range(n)
    ]


async def fill_jobs(
    nc: Client, bucket: str, docs: Sequence[dict[str, Any]], batch: int = 2000
) -> float:
    """Store job documents in a jobs bucket exactly as the service would; returns seconds.

    Uses the service's own `JobManager` on a `JetStreamJobStore` sharing `nc`, with a paused
    scheduler (nothing fires here): each document is validated, encoded in the store's
    record format and written with a compare-and-set; `batch` creates are awaited together,
    so the store's writer pipelines them.
    """
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from nats_apscheduler.jobs import JOBSTORE, JobManager, Limits
    from nats_apscheduler.store import JetStreamJobStore

    started = time.perf_counter()
    store = JetStreamJobStore(bucket=bucket, nc=nc)
    await store.open()
    scheduler = AsyncIOScheduler(timezone=UTC)
    scheduler.add_jobstore(store, JOBSTORE)
    scheduler.start(paused=True)
    manager = JobManager(scheduler, store, Limits(max_payload=nc.max_payload))
    try:
        for at in range(0, len(docs), batch):
            await asyncio.gather(*(manager.create(doc) for doc in docs[at : at + batch]))
        await store.aflush()
    finally:
        await store.aclose()
        with contextlib.suppress(Exception):
            scheduler.shutdown(wait=False)
    return time.perf_counter() - started


async def kv_last_seq(nc: Client, bucket: str) -> int:
    info = await nc.jetstream().stream_info(f"KV_{bucket}")
    return int(info.state.last_seq)


# --- receiving fires ----------------------------------------------------------------------------


@dataclass
class FireCollector:
    """Records (headers, receive time) of every message on a subject; parses nothing live."""

    records: list[tuple[dict[str, str], float]] = field(default_factory=list)

    async def subscribe(self, nc: Client, subject: str) -> Any:
        return await nc.subscribe(
            subject, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    async def _on_msg(self, msg: Msg) -> None:
        self.records.append((msg.headers or {}, time.time()))


def _parse_ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def fire_stats(
    records: list[tuple[dict[str, str], float]],
    w0: float,
    w1: float,
    jobs: int,
    scheduled_of: Any = None,
) -> dict[str, Any]:
    """Lateness and missed slots of fires whose scheduled time is in [w0, w1).

    Jobs fire every 1 s and the window is whole seconds, so every job has exactly
    (w1 - w0) slots in it; a slot counts as fired if at least one message carries it.
    `scheduled_of(headers)` gives a record's (key, scheduled time); default: nats-cron's
    `Nats-Cron-Job` / `Nats-Cron-Scheduled` headers.
    """
    if scheduled_of is None:

        def scheduled_of(h: dict[str, str]) -> tuple[str, float]:
            return h.get("Nats-Cron-Job", ""), _parse_ts(h["Nats-Cron-Scheduled"])

    late: list[float] = []
    seen: Counter[tuple[str, int]] = Counter()
    for headers, received in records:
        try:
            key, scheduled = scheduled_of(headers)
        except (KeyError, ValueError):
            continue
        if not (w0 <= scheduled < w1):
            continue
        seen[(key, round(scheduled * 1000))] += 1
        late.append(received - scheduled)
    expected = jobs * round(w1 - w0)
    fired = len(seen)
    return {
        "expected": expected,
        "fired": fired,
        "missed": max(0, expected - fired),
        "duplicates": sum(n - 1 for n in seen.values() if n > 1),
        "lateness": summary(late),
    }


def passes(trial: dict[str, Any], p99_limit_ms: float) -> bool:
    lat = trial.get("lateness") or {}
    p99 = lat.get("p99_ms")
    return trial.get("missed", 1) == 0 and p99 is not None and p99 < p99_limit_ms


# --- profiling -----------------------------------------------------------------------------------


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


class Profiler:
    """py-spy record attached to a pid for a while; `summary()` aggregates per function."""

    def __init__(self, pid: int, seconds: float, out: Path, rate: int = 250) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        tool = py_spy()
        if tool is None:
            note("py-spy not found (pip install py-spy): no profile")
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = PROCS.add(
            subprocess.Popen(
                [
                    tool,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(max(1, round(seconds))),
                    "--rate",
                    str(rate),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "-o",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        self.rate = rate
        self.seconds = seconds

    async def finish(self) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), self.seconds + 20)
        except TimeoutError:
            self.proc.terminate()
        return summarise_collapsed(self.out, self.rate)


def _frame_name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short})"


def summarise_collapsed(path: Path, rate: int, top: int = 25) -> dict[str, Any] | None:
    """Self and inclusive share of samples per function from a py-spy `raw` file."""
    if not path.exists():
        return None
    total = 0
    incl: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [
            _frame_name(f)
            for f in stack.split(";")
            if not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames:
            continue
        for name in set(frames):
            incl[name] += n
        self_[frames[-1]] += n
        # Self time by package: where the CPU actually is.
        leaf = stack.split(";")[-1]
        where = leaf.partition(" (")[2]
        by_file[_package_of(where)] += n
    if total == 0:
        return {"samples": 0}

    def pct(c: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in c.most_common(top)]

    return {
        "samples": total,
        "busy_seconds": round(total / rate, 2),
        "file": str(path),
        "self_by_package_pct": pct(by_file),
        "inclusive_pct": pct(incl),
        "self_pct": pct(self_),
    }


def _package_of(where: str) -> str:
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            rest = path.split(marker, 1)[1]
            return rest.split("/", 1)[0].removesuffix(".py")
    if "/nats_apscheduler/" in path:
        return "nats_apscheduler"
    return Path(path).name or "?"


# --- worker processes (bench/_worker.py) --------------------------------------------------------


@dataclass
class WorkerRun:
    """A `bench/_worker.py` child: a JSON line when its window is planned, one at the end."""

    config: dict[str, Any]
    proc: asyncio.subprocess.Process | None = None
    window: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    stderr: bytearray = field(default_factory=bytearray)
    _drain: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = PROCS.add(
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(BENCH / "_worker.py"),
                json.dumps(self.config),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        )
        # Keep reading stderr (its tail is kept): a full pipe would block the child.
        self._drain = asyncio.get_running_loop().create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.stderr += chunk
            del self.stderr[:-20000]

    async def next_line(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            await asyncio.sleep(0.2)
            raise RuntimeError(f"worker ended early: {self.stderr.decode()[-2000:]}")
        return dict(json.loads(line))

    async def wait(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None
        self.result = await self.next_line(timeout)
        await asyncio.wait_for(self.proc.wait(), 30)
        return self.result

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        if self.proc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), 10)
            with contextlib.suppress(ValueError):
                PROCS.items.remove(self.proc)
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain, 5)


async def connect(url: str) -> Client:
    return await nats.connect(url, max_reconnect_attempts=0, pending_size=64 * 1024 * 1024)


def sleep_until(ts: float) -> Any:
    return asyncio.sleep(max(0.0, ts - time.time()))


async def wait_spread(nc: Client, shards: int, instances: int, timeout: float = 30.0) -> None:
    """Wait until every shard is led and no instance holds more than its fair share."""
    from nats_apscheduler.client import CronClient

    api = CronClient(nc, timeout=5)
    share = math.ceil(shards / instances)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            status = await api.status()
            held: dict[str, int] = {}
            for shard in status.get("shards") or []:
                if shard.get("owner"):
                    held[shard["owner"]] = held.get(shard["owner"], 0) + 1
            spread = len(held) == instances and sum(held.values()) == shards
            if spread and max(held.values()) <= share:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{shards} shards not spread over {instances} instances")


# --- the service's event-loop stalls, from its /metrics ------------------------------------

# A histogram of how late the instance's 50 ms loop monitor ran (nats_apscheduler.observe).
LAG = "nats_cron_loop_lag_seconds"


async def scrape_buckets(port: int, name: str, timeout: float = 10.0) -> dict[float, float] | None:
    """The cumulative buckets (`le` -> count) of one histogram of the service's /metrics."""
    body = await _scrape(port, timeout)
    if body is None:
        return None
    pattern = rb"^" + re.escape(name.encode()) + rb'_bucket\{le="([^"]+)"\} (\S+)$'
    return {
        float(le.decode()): float(count) for le, count in re.findall(pattern, body, re.MULTILINE)
    }


def stall_bound(before: dict[float, float] | None, after: dict[float, float] | None) -> Any:
    """The upper bound of the highest histogram bucket whose (per-bucket) count grew."""
    if not before or not after:
        return None
    bounds = sorted(after)
    grew = None
    for i, bound in enumerate(bounds):
        below = bounds[i - 1] if i else None
        now = after[bound] - (after[below] if below is not None else 0)
        then = before.get(bound, 0) - (before.get(below, 0) if below is not None else 0)
        if now > then:
            grew = bound
    if grew == float("inf"):
        return 2 * bounds[-2]  # above the highest finite bound (reported as twice it)
    return grew


async def _scrape(port: int, timeout: float) -> bytes | None:
    """The service's /metrics (served on its own event loop: a stalled loop answers late)."""

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        body = await reader.read()
        writer.close()
        return body

    try:
        return await asyncio.wait_for(get(), timeout)
    except (OSError, TimeoutError):
        return None


def metrics_port(line: dict[str, Any]) -> int:
    """The port of a `serve` started with `NATS_CRON_METRICS_PORT=0`, from its log line."""
    found = re.search(r":(\d+)/metrics", str(line.get("msg", "")))
    if found is None:
        raise ValueError(f"no metrics port in {line.get('msg')!r}")
    return int(found.group(1))


def lag_samples_above(
    before: dict[float, float] | None, after: dict[float, float] | None, bound: float
) -> int | None:
    """How many loop-lag samples between two scrapes were later than `bound` (a bucket's
    upper bound): the loop's stalls of more than `bound` seconds in that window."""
    if not before or not after or bound not in after:
        return None
    total = after[float("inf")] - before.get(float("inf"), 0)
    within = after[bound] - before.get(bound, 0)
    return int(total - within)
