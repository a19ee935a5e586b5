"""Run the `nats-cron` CLI as a real subprocess with a controlled environment."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats_cron_cli.app import app
from typer.testing import CliRunner

from nats_apscheduler.embedded import EmbeddedNatsServer
from tests.helpers.cluster import ServeProcess

# Credential and context variables of the `nats` CLI: never let a developer's own leak in.
CRED_VARS = (
    "NATS_CREDS",
    "NATS_USER",
    "NATS_PASSWORD",
    "NATS_TOKEN",
    "NATS_NKEY",
    "NATS_CA",
    "NATS_CERT",
    "NATS_KEY",
    "NATS_CONTEXT",
)

CLI = [sys.executable, "-m", "nats_cron_cli"]


def closed_port_url() -> str:
    """A loopback URL nobody listens on (a port just bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"nats://127.0.0.1:{port}"


def cli_env(xdg: Path, url: str | None, **extra: str) -> dict[str, str]:
    """os.environ without NATS_URL and credentials, with its own XDG config dir."""
    env = {k: v for k, v in os.environ.items() if k not in CRED_VARS and k != "NATS_URL"}
    env["XDG_CONFIG_HOME"] = str(xdg)
    env["COLUMNS"] = "200"  # rich folds table cells at the default 80 columns
    env["PYTHONUNBUFFERED"] = "1"
    if url is not None:
        env["NATS_URL"] = url
    env.update(extra)
    return env


def service_env(url: str, name: str, **extra: str) -> dict[str, str]:
    """Environment of a `nats-cron serve` process with buckets of its own."""
    return {
        "NATS_URL": url,
        "NATS_CRON_JOBS_BUCKET": f"{name}-jobs",
        "NATS_CRON_LEADER_BUCKET": f"{name}-leader",
        "NATS_CRON_EVENTS_STREAM": f"H_{name}".replace(".", "_"),
        "NATS_CRON_EVENTS_PREFIX": f"ev.{name}",
        "NATS_CRON_METRICS_PORT": "",
        "LOG_LEVEL": "info",
        **{var: "" for var in CRED_VARS},  # empty means unset for the service
        **extra,
    }


@dataclass
class Result:
    args: list[str]
    code: int
    out: str
    err: str
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.out)

    def __str__(self) -> str:
        return (
            f"nats-cron {' '.join(self.args)} -> exit {self.code} in {self.elapsed:.2f}s\n"
            f"--- stdout\n{self.out}--- stderr\n{self.err}"
        )


@dataclass
class Cli:
    """`cli("list", "--json")` runs `python -m nats_cron_cli list --json`."""

    env: dict[str, str]
    history: list[Result] = field(default_factory=list)

    def __call__(
        self,
        *args: str,
        input: str | None = None,
        stdin_devnull: bool = False,
        env: dict[str, str] | None = None,
        timeout: float = 30,
        fast: bool = False,
        cwd: Path | None = None,
    ) -> Result:
        if fast:
            return self.fast(*args, input=input)
        start = time.monotonic()
        proc = subprocess.run(
            [*CLI, *args],
            env=env if env is not None else self.env,
            input=input,
            stdin=subprocess.DEVNULL if stdin_devnull else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
        result = Result(
            list(args), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start
        )
        self.history.append(result)
        return result

    def fast(self, *args: str, input: str | None = None) -> Result:
        """The same command in this process (Typer's CliRunner): for quick checks."""
        environ: dict[str, str | None] = {k: None for k in os.environ if k not in self.env}
        environ.update(self.env)
        start = time.monotonic()
        res = CliRunner().invoke(app, list(args), input=input, env=environ)
        err = res.stderr
        self.history.append(Result(list(args), res.exit_code, res.stdout, err, 0.0))
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            err += f"\nTraceback: {res.exception!r}"
        return Result(list(args), res.exit_code, res.stdout, err, time.monotonic() - start)

    def fast_ok(self, *args: str, input: str | None = None) -> Result:
        return self.ok(*args, input=input, fast=True)

    def ok(self, *args: str, **kwargs: Any) -> Result:
        result = self(*args, **kwargs)
        assert result.code == 0, str(result)
        assert "Traceback" not in result.err, str(result)
        return result

    def fails(self, code: int, *args: str, **kwargs: Any) -> Result:
        """Exits `code`, says `error: ...` on stderr, prints no traceback."""
        result = self(*args, **kwargs)
        assert result.code == code, str(result)
        assert any(line.startswith("error: ") for line in result.err.splitlines()), str(result)
        assert "Traceback" not in result.err, str(result)
        return result


@dataclass
class Service:
    """A `nats-cron serve` process on a nats-server of the test module's own (the API
    subjects are not per bucket, so two services on one server would answer each other)."""

    server: EmbeddedNatsServer
    proc: ServeProcess
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def instance_id(self) -> str:
        return self.proc.instance_id


def start_service(server: EmbeddedNatsServer, name: str, **extra: str) -> Service:
    env = service_env(server.url, name, **extra)
    proc = ServeProcess(f"{name}-a", env)
    try:
        proc.wait_for("nats-cron instance started", timeout=15)
        proc.wait_for("won the lease", timeout=15)
    except BaseException:
        proc.stop()
        raise
    return Service(server, proc, env)
