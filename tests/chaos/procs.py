"""The chaos run's child processes: `nats-server` nodes and `nats-cron serve` instances.

Every child runs in a session (process group) of its own, so a signal aimed at one never
reaches the harness or a sibling, and cleanup kills the whole group. On Linux the children
are also started under `setpriv --pdeathsig KILL`, so they die with the harness even if
the harness itself is killed with SIGKILL and cannot clean up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from nats_apscheduler.embedded import nats_server_binary

_READY = "Server is ready"


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (the OS picks them)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _guard() -> list[str]:
    """A prefix that makes the child die with us (the parent *thread*: spawn from main)."""
    tool = shutil.which("setpriv")
    if tool is None or not sys.platform.startswith("linux"):
        return []
    return [tool, "--pdeathsig", "KILL", "--"]


def _killpg(proc: subprocess.Popen[str], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _terminate(proc: subprocess.Popen[str], timeout: float) -> None:
    """SIGTERM the child's group (SIGCONT first: a stopped process cannot act on it)."""
    if proc.poll() is not None:
        return
    _killpg(proc, signal.SIGCONT)
    _killpg(proc, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc, signal.SIGKILL)
        proc.wait(5)


class _Child:
    """A child process whose stderr lines are kept in memory and copied to a log file."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self.expected_exit = False  # set when the harness stops or kills it on purpose

    def _spawn(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.expected_exit = False
        self.proc = subprocess.Popen(
            [*_guard(), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        log = self.log_path.open("a", encoding="utf-8")
        threading.Thread(
            target=self._pump, args=(self.proc, log), name=f"log-{self.name}", daemon=True
        ).start()

    def _pump(self, proc: subprocess.Popen[str], log: TextIO) -> None:
        assert proc.stderr is not None
        try:
            for line in proc.stderr:
                log.write(line)
                with self._lock:
                    self.lines.append(line.rstrip("\n"))
                self._on_line(line)
        finally:
            log.close()

    def _on_line(self, line: str) -> None:
        pass

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def tail(self, n: int = 15) -> str:
        with self._lock:
            return "\n".join(self.lines[-n:])

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL (the whole group), as a crash would."""
        if self.proc is None:
            return
        self.expected_exit = True
        _killpg(self.proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def terminate(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        self.expected_exit = True
        _terminate(self.proc, timeout)


class NatsNode(_Child):
    """One `nats-server` with JetStream on a fixed loopback port, restartable in place."""

    def __init__(self, name: str, port: int, config: Path, workdir: Path) -> None:
        super().__init__(name, workdir / f"{name}.log")
        self.port = port
        self.config = config
        self.starts = 0
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _on_line(self, line: str) -> None:
        if _READY in line:
            self._ready.set()

    def start(self) -> None:
        """Spawn it; `await wait_ready()` afterwards. Call on the main thread (pdeathsig)."""
        self._ready = threading.Event()
        self._spawn([nats_server_binary(), "-c", str(self.config)])
        self.starts += 1

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.is_set():
            if not self.alive():
                raise RuntimeError(f"{self.name} exited while starting:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.05)


class ServeInstance(_Child):
    """One `python -m nats_cron_cli serve` process; its JSON log lines are parsed."""

    def __init__(self, slot: int, incarnation: int, env: dict[str, str], workdir: Path) -> None:
        instance_id = f"i{slot}" if incarnation == 0 else f"i{slot}r{incarnation}"
        super().__init__(instance_id, workdir / f"serve-{instance_id}.log")
        self.slot = slot
        self.incarnation = incarnation
        self.instance_id = instance_id
        self.events: list[dict[str, Any]] = []
        self._spawn(
            [sys.executable, "-m", "nats_cron_cli", "serve"],
            env={**_clean_environ(), **env, "INSTANCE_ID": instance_id},
        )

    def _on_line(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return  # a traceback or other non-JSON output: kept in `lines`
        if isinstance(event, dict):
            with self._lock:
                self.events.append(event)

    def find(self, msg: str, since: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            events = self.events[since:]
        return [e for e in events if str(e.get("msg", "")).startswith(msg)]

    def mark(self) -> int:
        """A position in the event list, for `wait_log(..., since=mark)`."""
        with self._lock:
            return len(self.events)

    async def wait_log(self, msg: str, timeout: float, since: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(msg, since)
            if found:
                return found[0]
            if not self.alive() or time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.instance_id}: no {msg!r} within {timeout}s "
                    f"(exit code {self.returncode()}); log tail:\n{self.tail()}"
                )
            await asyncio.sleep(0.05)

    def wins(self) -> list[tuple[int, float]]:
        """(epoch, wall-clock time) of every "won the lease" line."""
        out = []
        for event in self.find("won the lease"):
            with contextlib.suppress(KeyError, ValueError, TypeError):
                out.append((int(event["epoch"]), datetime.fromisoformat(event["time"]).timestamp()))
        return out


def _clean_environ() -> dict[str, str]:
    """Our environment without settings that would steer the instances elsewhere."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("NATS_", "INSTANCE_ID", "LOG_LEVEL"))
    }


def single_config(path: Path, port: int, store: Path) -> Path:
    path.write_text(
        "# chaos harness: one nats-server with JetStream on loopback\n"
        "server_name: chaos-single\n"
        f"host: 127.0.0.1\nport: {port}\n"
        f'jetstream {{\n  store_dir: "{store}"\n}}\n',
        encoding="utf-8",
    )
    return path


def cluster_configs(workdir: Path, ports: list[int], cluster_ports: list[int]) -> list[Path]:
    """Three nodes with routes to each other. `no_advertise` keeps the nodes' own client
    URLs out of INFO, so a client that reaches them through a proxy never bypasses it."""
    routes = ", ".join(f"nats://127.0.0.1:{p}" for p in cluster_ports)
    paths = []
    for i, (port, cport) in enumerate(zip(ports, cluster_ports, strict=True)):
        path = workdir / f"n{i}.conf"
        store = workdir / f"n{i}-js"
        path.write_text(
            "# chaos harness: one node of a three-node JetStream cluster on loopback\n"
            f"server_name: n{i}\n"
            f"host: 127.0.0.1\nport: {port}\n"
            f'jetstream {{\n  store_dir: "{store}"\n}}\n'
            "cluster {\n"
            "  name: chaos\n"
            f"  host: 127.0.0.1\n  port: {cport}\n"
            f"  routes: [{routes}]\n"
            "  no_advertise: true\n"
            "}\n",
            encoding="utf-8",
        )
        paths.append(path)
    return paths
