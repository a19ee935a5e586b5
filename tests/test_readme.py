"""The README's examples, run as written (only the server URL and names substituted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from nats_apscheduler.embedded import EmbeddedNatsServer
from nats_apscheduler.store import JetStreamJobStore
from tests.helpers.cluster import ServeProcess

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def block_after(marker: str) -> str:
    match = re.search(re.escape(marker) + r".*?```python\n(.*?)```", README, re.DOTALL)
    assert match, f"no python block after {marker!r}"
    return match.group(1)


def run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env={**env}, capture_output=True, text=True, timeout=60
    )


def test_plugin_example_persists_its_job(nats_url: str, bucket: str) -> None:
    import os

    code = block_after("<!-- plugin-example").replace('"my-app-jobs"', f'"{bucket}"')
    env = {**os.environ, "NATS_URL": nats_url}
    for _ in range(2):  # the second run replaces the job (replace_existing=True)
        result = run(code, env)
        assert result.returncode == 0, result.stderr
        assert "['tick']" in result.stdout
    # `tick` lived in the example's __main__; bind its reference to a stand-in here.
    store = JetStreamJobStore(bucket=bucket, url=nats_url, functions={"__main__:tick": print})
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_jobstore(store)
    scheduler.start(paused=True)
    try:
        job = store.lookup_job("tick")
        assert job is not None and job.next_run_time is not None
        assert job.trigger.interval.total_seconds() == 30
    finally:
        scheduler.shutdown()


def test_first_job_example_against_a_running_service(fresh_server: EmbeddedNatsServer) -> None:
    import os

    code = block_after("## A first job").replace("nats://127.0.0.1:4222", fresh_server.url)
    service = ServeProcess("readme", {"NATS_URL": fresh_server.url})
    try:
        service.wait_for("won the lease")
        result = run(code, dict(os.environ))
        assert result.returncode == 0, result.stderr
        assert "greeting" in result.stdout and "Nats-Msg-Id" in result.stdout
        assert "'is_leader'" in result.stdout
    finally:
        service.stop()


async def test_exactly_once_example_drops_a_second_fire_of_a_slot(
    fresh_server: EmbeddedNatsServer,
) -> None:
    """The Guarantees section's stream: two fires of one slot (same Nats-Msg-Id, as after
    a failover) are stored once, and the example's worker gets that one."""
    import asyncio
    import os

    import nats

    code = block_after("<!-- exactly-once-example")
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code,
        env={**os.environ, "NATS_URL": fresh_server.url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    nc = await nats.connect(fresh_server.url)
    try:
        js = nc.jetstream()

        async def stream_exists() -> None:
            while True:
                try:
                    await js.stream_info("JOBS")
                    return
                except nats.js.errors.NotFoundError:
                    await asyncio.sleep(0.05)  # poll interval

        await asyncio.wait_for(stream_exists(), 20)
        headers = {
            "Nats-Msg-Id": "jobs.cleanup:1767225600000",
            "Nats-Cron-Scheduled": "2026-01-01T00:00:00.000Z",
        }
        for _ in range(2):  # the slot fired twice (e.g. a leader died right after firing)
            await nc.publish("jobs.cleanup", b"work", headers=headers)
        await nc.flush()
        out, err = await asyncio.wait_for(worker.communicate(), 30)
        assert worker.returncode == 0, err.decode()
        assert out.decode().splitlines() == ["jobs.cleanup 2026-01-01T00:00:00.000Z"]
        info = await js.stream_info("JOBS")
        assert info.state.last_seq == 1, "the second fire of the slot was stored"
        assert info.state.messages == 0  # acknowledged: a work queue forgets it
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        await nc.close()


def test_delivery_example_retries_a_failed_request(fresh_server: EmbeddedNatsServer) -> None:
    """The Delivery section's request job: its worker fails the first attempt on purpose,
    the retry succeeds, and the example prints both outcomes from the job's events."""
    import os

    code = block_after("<!-- delivery-example").replace("nats://127.0.0.1:4222", fresh_server.url)
    service = ServeProcess("readme-delivery", {"NATS_URL": fresh_server.url})
    try:
        service.wait_for("won the lease")
        result = run(code, {**os.environ, "NATS_URL": fresh_server.url})
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["1 failed 503 not yet", "2 succeeded report built"]
    finally:
        service.stop()
