"""A separate process driving a `JetStreamJobStore`, for the cross-process store tests.

Run as a script (not imported by pytest, except for its job function `emit`):

    python tests/helpers/store_proc.py add URL BUCKET REF N
        add N jobs calling REF (a `module:function` reference, e.g. this module's `emit`)
        through a paused scheduler, flush, print one line `JOBS {"id": "next_run_time", ...}`
        and exit 0.

    python tests/helpers/store_proc.py run URL BUCKET REF
        run a BackgroundScheduler on the bucket with REF on the allow-list, print `READY`
        once the store has loaded, then `FIRED <tag> <unix time>` each time a job calling
        `emit` runs; shut down (print `STOPPED`) when stdin reaches end of file.

`REF` is passed by the test so that both processes use the same textual reference,
whatever name pytest imported this module under.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path


def emit(tag: str) -> None:
    """The job function: report the fire on stdout (read by the test)."""
    print(f"FIRED {tag} {time.time():.6f}", flush=True)


def _make_importable() -> None:
    here = Path(__file__).resolve().parent
    for path in (str(here.parent.parent), str(here.parent)):  # repo root and tests/
        if path not in sys.path:
            sys.path.insert(0, path)


def _add(url: str, bucket: str, ref: str, count: int) -> int:
    from apscheduler.schedulers.background import BackgroundScheduler

    from nats_apscheduler.spec import EveryTrigger
    from nats_apscheduler.store import JetStreamJobStore

    store = JetStreamJobStore(bucket=bucket, url=url, functions=[ref], timeout=5)
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_jobstore(store, "default")
    scheduler.start(paused=True)
    anchor = datetime(2031, 1, 1, tzinfo=UTC)
    jobs = {}
    for i in range(count):
        job = scheduler.add_job(
            ref,
            trigger=EveryTrigger(timedelta(minutes=i + 1), anchor + timedelta(seconds=i)),
            id=f"proc-{i:03d}",
            name=f"proc job {i}",
            args=[f"proc-{i:03d}"],
            kwargs={},
        )
        jobs[job.id] = job.next_run_time.isoformat()
    store.flush()
    scheduler.shutdown(wait=False)
    print("JOBS " + json.dumps(jobs), flush=True)
    return 0


def _run(url: str, bucket: str, ref: str) -> int:
    from apscheduler.schedulers.background import BackgroundScheduler

    from nats_apscheduler.store import JetStreamJobStore

    store = JetStreamJobStore(bucket=bucket, url=url, functions=[ref], timeout=5)
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_jobstore(store, "default")
    scheduler.start()
    print("READY", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    scheduler.shutdown(wait=True)
    print("STOPPED", flush=True)
    return 0


def main(argv: list[str]) -> int:
    _make_importable()
    mode, url, bucket, ref, *rest = argv
    if mode == "add":
        return _add(url, bucket, ref, int(rest[0]))
    if mode == "run":
        return _run(url, bucket, ref)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
