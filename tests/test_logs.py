"""A real `nats-cron serve` against a nats-server that requires credentials: its stderr is
JSON lines only, never carries a secret, and it exits 0 on SIGTERM; a wrong password
ends it with a non-zero exit and a clear error line.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import pytest

from nats_apscheduler.client import CronClient
from nats_apscheduler.embedded import EmbeddedNatsServer
from nats_apscheduler.logs import RepeatFilter
from tests.helpers.cluster import ServeProcess

PASSWORD = "S3cretPassw0rd"
TOKEN = "T0kenS3cretXyz"
WRONG = "Wr0ngPassw0rdQ"
CREDENTIAL_VARS = ("NATS_CREDS", "NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_NKEY")
LEVELS = {"debug", "info", "warning", "error", "critical"}


@dataclass
class AuthServer:
    server: EmbeddedNatsServer
    secret: str
    env: dict[str, str]  # for `serve`: the secret in NATS_URL and in its own variable
    connect: dict[str, Any]  # for the test's own client


@pytest.fixture(params=["password", "token"])
def auth_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuthServer]:
    if request.param == "password":
        args = ["--user", "alice", "--pass", PASSWORD]
    else:
        args = ["--auth", TOKEN]
    server = EmbeddedNatsServer(tmp_path / "js", extra_args=args).start()
    base = {var: "" for var in CREDENTIAL_VARS}
    host = f"127.0.0.1:{server.port}"
    if request.param == "password":
        env = {
            **base,
            "NATS_URL": f"nats://alice:{PASSWORD}@{host}",
            "NATS_USER": "alice",
            "NATS_PASSWORD": PASSWORD,
        }
        connect: dict[str, Any] = {"user": "alice", "password": PASSWORD}
        secret = PASSWORD
    else:
        env = {**base, "NATS_URL": f"nats://{TOKEN}@{host}", "NATS_TOKEN": TOKEN}
        connect = {"token": TOKEN}
        secret = TOKEN
    yield AuthServer(server, secret, env, {"servers": [server.url], **connect})
    server.stop()


def serve_env(extra: dict[str, str]) -> dict[str, str]:
    return {**extra, "LOG_LEVEL": "debug", "NATS_CRON_LEASE_TTL": "1s"}


def check_json_lines(raw: list[str]) -> list[dict[str, Any]]:
    parsed = []
    for line in raw:
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(record, dict), line
        assert {"time", "level", "msg"} <= record.keys(), line
        assert record["level"] in LEVELS, line
        datetime.fromisoformat(record["time"])
        assert isinstance(record["msg"], str) and record["msg"], line
        parsed.append(record)
    return parsed


async def test_serve_logs_json_without_secrets(auth_server: AuthServer, bucket: str) -> None:
    proc = ServeProcess("logs-1", serve_env(auth_server.env))
    try:
        await proc.await_log("nats-cron instance started", timeout=15)
        await proc.await_log("won the lease", timeout=10)
        nc = await nats.connect(**auth_server.connect)
        try:
            subject = f"{bucket}.tick"
            sub = await nc.subscribe(subject)
            await nc.flush()
            await nc.flush()  # nats-py's first PING can overtake the SUB (see test_fire)
            api = CronClient(nc, timeout=5)
            document = {
                "target": {"subject": subject},
                "schedule": {"every": "1s"},
                "payload": {"type": "text", "data": "hello"},
            }
            assert (await api.create(document))["status"] == "created"
            msg = await sub.next_msg(timeout=10)
            assert msg.data == b"hello"
            assert msg.headers is not None and msg.headers["Nats-Cron-Instance"] == "logs-1"
            fired = await proc.await_log("fired", timeout=5)
            assert fired["level"] == "debug" and fired["subject"] == subject
        finally:
            await nc.close()
        proc.signal(signal.SIGTERM)
        assert await proc.wait_exit(timeout=15) == 0
        await proc.await_log("nats-cron instance stopped", timeout=5)
    finally:
        proc.stop()
    assert proc.raw, "serve wrote nothing to stderr"
    records = check_json_lines(proc.raw)
    everything = "".join(proc.raw)
    assert auth_server.secret not in everything
    assert any(r["level"] == "debug" for r in records)
    assert all(r.get("instance_id") == "logs-1" for r in records if r.get("logger") is None)
    print(f"{len(records)} JSON lines, no secret")


async def test_wrong_password_exits_non_zero_with_a_clear_error(tmp_path: Path) -> None:
    server = EmbeddedNatsServer(
        tmp_path / "js", extra_args=["--user", "alice", "--pass", PASSWORD]
    ).start()
    env = {
        **{var: "" for var in CREDENTIAL_VARS},
        "NATS_URL": f"nats://alice:{WRONG}@127.0.0.1:{server.port}",
        "NATS_USER": "alice",
        "NATS_PASSWORD": WRONG,
    }
    proc = ServeProcess("logs-bad", serve_env(env))
    try:
        # The connect timeout is 5 s; an authorization error needs no retries.
        try:
            code = await proc.wait_exit(timeout=8)
        except subprocess.TimeoutExpired:
            tail = "".join(proc.raw[-3:])
            proc.signal(signal.SIGTERM)
            try:
                await proc.wait_exit(timeout=3)
                sigterm = "it did exit on SIGTERM"
            except subprocess.TimeoutExpired:
                sigterm = "it ignored SIGTERM too"
            raise AssertionError(
                f"serve still running 8 s after an authorization error ({sigterm}); "
                f"log tail:\n{tail}"
            ) from None
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
        proc.stop()
        server.stop()
    assert code != 0
    records = check_json_lines(proc.raw)
    errors = [r for r in records if r["level"] == "error"]
    assert errors, "no error line"
    assert any("authoriz" in r["msg"].lower() for r in errors), errors
    everything = "".join(proc.raw)
    assert WRONG not in everything and PASSWORD not in everything


# --- repeated warnings, text format, tracebacks (issue 13) -------------------------------------


def _record(message: str, level: str = "WARNING", function: str = "f") -> dict[str, Any]:
    return {"level": SimpleNamespace(name=level), "function": function, "message": message,
            "extra": {}}  # fmt: skip


def test_repeat_filter_lets_one_through_per_window() -> None:
    now = [0.0]
    keep = RepeatFilter(10.0, clock=lambda: now[0])
    assert keep(_record("NATS error: refused"))
    for _ in range(39):  # one every 0.25 s, for 9.75 s
        now[0] += 0.25
        assert not keep(_record("NATS error: refused"))
    assert keep(_record("NATS error: reset"))  # another message is another key
    assert keep(_record("NATS error: refused", function="g"))  # another place too
    assert keep(_record("failed", level="ERROR")) and keep(_record("failed", level="ERROR"))
    assert keep(_record("x", level="INFO")) and keep(_record("x", level="INFO"))
    now[0] += 0.5  # 10.25 s after the first: the next one says what was left out
    again = _record("NATS error: refused")
    assert keep(again)
    assert again["extra"]["repeated"] == 39
    now[0] += 1
    quiet = _record("NATS error: refused")
    assert not keep(quiet)
    now[0] += 20
    fresh = _record("NATS error: refused")
    assert keep(fresh) and fresh["extra"]["repeated"] == 1


async def test_warnings_while_nats_is_down_are_rate_limited(tmp_path: Path) -> None:
    """A follower tries to reconnect every 0.25 s while NATS is down: one warning per
    message, not one per try (113 lines in 29 s before)."""
    server = EmbeddedNatsServer(tmp_path / "js").start()
    env = {**{var: "" for var in CREDENTIAL_VARS}, "NATS_URL": server.url}
    leader = ServeProcess("rl-a", {**env, "NATS_CRON_JOBS_BUCKET": "rl-jobs"})
    follower: ServeProcess | None = None
    try:
        await leader.await_log("won the lease", timeout=15)
        follower = ServeProcess("rl-b", {**env, "NATS_CRON_JOBS_BUCKET": "rl-jobs"})
        await follower.await_log("nats-cron instance started", timeout=15)
        server.stop()
        await follower.await_log("NATS error: [Errno 111]", timeout=10)
        await asyncio.sleep(4)  # ~16 reconnect attempts: the warnings they cause are the test
        server = EmbeddedNatsServer(tmp_path / "js", port=server.port).start()
        await follower.await_log("NATS connection restored", timeout=20)
    finally:
        leader.stop()
        if follower is not None:
            follower.stop()
        server.stop()
    assert follower is not None
    for proc in (leader, follower):
        refused = [r for r in proc.lines if "Connect call failed" in str(r.get("msg"))]
        assert 1 <= len(refused) <= 2, [r["msg"] for r in refused]


async def test_text_logs_on_request_and_on_a_terminal(nats_url: str, bucket: str) -> None:
    base = {
        **{var: "" for var in CREDENTIAL_VARS},
        "NATS_URL": nats_url,
        "NATS_CRON_JOBS_BUCKET": f"{bucket}-jobs",
        "NATS_CRON_LEADER_BUCKET": f"{bucket}-leader",
        "INSTANCE_ID": "text-1",
    }
    # --log-format text on a pipe
    proc = ServeProcess("text-1", base, args=["--log-format", "text"])
    try:
        await asyncio.to_thread(_wait_raw, proc, "nats-cron instance started")
    finally:
        proc.stop()
    started = next(line for line in proc.raw if "nats-cron instance started" in line)
    assert not started.startswith("{"), started
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3} INFO +nats-cron instance started", started), started
    assert "jobs=0" in started and "bucket=" in started
    assert "\x1b[" not in "".join(proc.raw), "colours on a pipe"

    # the default on a terminal: text (with colours); NATS_CRON_LOG_FORMAT=json overrides it
    for env, text in (({}, True), ({"NATS_CRON_LOG_FORMAT": "json"}, False)):
        main, child = pty.openpty()
        proc2 = subprocess.Popen(
            [sys.executable, "-m", "nats_cron_cli", "serve"],
            env={**os.environ, **base, **env},
            stdout=subprocess.DEVNULL,
            stderr=child,
        )
        os.close(child)
        try:
            out = await asyncio.to_thread(_read_until, main, b"nats-cron instance started")
        finally:
            proc2.terminate()
            proc2.wait(10)
            os.close(main)
        line = next(x for x in out.splitlines() if "nats-cron instance started" in x)
        assert line.lstrip().startswith("{") is not text, line
        if text:
            assert "\x1b[" in out  # coloured for a person


def _wait_raw(proc: ServeProcess, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in proc.raw):
        assert time.monotonic() < deadline and proc.proc.poll() is None, "".join(proc.raw)
        time.sleep(0.05)  # poll interval


def _read_until(fd: int, marker: bytes, timeout: float = 15.0) -> str:
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, data.decode(errors="replace")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace")


NO_JETSTREAM = """
accounts {
  PLAIN { users: [{user: plain, password: plainpw}] }
}
"""


async def test_an_error_carries_its_traceback(tmp_path: Path) -> None:
    """serve in an account without JetStream cannot start: its error line has the
    traceback (JSON field `traceback`), and it exits 1."""
    conf = tmp_path / "plain.conf"
    conf.write_text(NO_JETSTREAM)
    server = EmbeddedNatsServer(tmp_path / "js", config_file=conf).start()
    env = {
        **{var: "" for var in CREDENTIAL_VARS},
        "NATS_URL": server.url,
        "NATS_USER": "plain",
        "NATS_PASSWORD": "plainpw",
    }
    proc = ServeProcess("tb-1", env)
    try:
        assert await proc.wait_exit(timeout=20) == 1
    finally:
        proc.stop()
        server.stop()
    errors = [r for r in check_json_lines(proc.raw) if r["level"] == "error"]
    assert errors, proc.raw
    failed = next(r for r in errors if r["msg"].startswith("could not start"))
    assert failed["traceback"].startswith("Traceback (most recent call last):"), failed
    assert "nats" in failed["traceback"] and failed["error"]
    assert "plainpw" not in "".join(proc.raw)
