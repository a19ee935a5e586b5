"""A real `nats-cron serve` against a nats-server that requires credentials: its stderr is
JSON lines only, never carries a secret, and it exits 0 on SIGTERM; a wrong password
ends it with a non-zero exit and a clear error line.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import nats
import pytest

from nats_apscheduler.client import CronClient
from nats_apscheduler.embedded import EmbeddedNatsServer
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
            assert await api.create(document) == {"status": "created"}
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
