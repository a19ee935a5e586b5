"""`list --watch` and `history --follow` with the real CLI against a real service: changes
and runs appear live, without the `nats` CLI, and Ctrl-C or SIGTERM ends them with exit 0.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nats_apscheduler.embedded import EmbeddedNatsServer
from tests.helpers.cli_run import CLI, Cli, Service, cli_env, start_service


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    server = EmbeddedNatsServer(tmp_path_factory.mktemp("live-js")).start()
    try:
        svc = start_service(server, "cli-live")
        try:
            yield svc
        finally:
            svc.proc.stop()
    finally:
        server.stop()


@pytest.fixture
def cli(service: Service, tmp_path: Path) -> Cli:
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    return Cli(cli_env(xdg, service.url))


class Live:
    """A long-running CLI command; its stdout lines arrive on a queue."""

    def __init__(self, cli: Cli, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*CLI, *args],
            env={**cli.env, "PYTHONFAULTHANDLER": "1"},  # a stack dump on SIGABRT
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self._err_pump = threading.Thread(target=self._pump_err, daemon=True)
        self._err_pump.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        self.err.extend(self.proc.stderr)

    def wait_err(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.err):
            assert time.monotonic() < deadline, f"no {text!r} on stderr: {self.err}"
            assert self.proc.poll() is None, self.err
            time.sleep(0.02)  # poll interval

    def next_line(self, contains: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no line with {contains!r}; stderr: {self.err}") from None
            if contains in line:
                return line

    def stop(self, sig: int) -> int:
        """Send `sig`; its exit code. A command still running 15 s later is a hang: the
        failure shows where each of its threads was (Python's faulthandler, on SIGABRT)."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(10)
            self._err_pump.join(5)  # ends with the process's stderr
            dump = "".join(self.err)
            raise AssertionError(f"still running 15 s after {sig!r}:\n{dump}") from None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def test_list_watch_shows_changes_live(cli: Cli) -> None:
    cli.ok("add", "watch.existing", "1h")
    live = Live(cli, "list", "watch.>", "--watch")
    try:
        assert live.next_line("watch.existing").startswith("watch.existing ")  # the table
        live.wait_err("watching for changes")
        cli.ok("add", "watch.new", "30s")
        assert "created" in live.next_line("watch.new")
        cli.ok("update", "watch.new", "45s")
        line = live.next_line("watch.new")
        assert "updated" in line and "every 45s" in line
        cli.ok("pause", "watch.new")
        assert "paused" in live.next_line("watch.new")
        cli.ok("add", "elsewhere.job", "1h")  # outside the pattern: not shown
        cli.ok("delete", "watch.new")
        line = live.next_line("watch.new")
        assert "deleted" in line and "elsewhere" not in line
    finally:
        code = live.stop(signal.SIGINT)
    assert code == 0, live.err
    assert not any("Traceback" in line for line in live.err), "".join(live.err)


def test_list_watch_json_lines(cli: Cli) -> None:
    cli.ok("add", "wjson.a", "1h")
    live = Live(cli, "list", "wjson.>", "--watch", "--json")
    try:
        first = json.loads(live.next_line("wjson.a"))
        assert first["change"] == "existing" and first["job"]["schedule"] == {"every": "1h"}
        live.wait_err("watching for changes")
        cli.ok("trigger", "wjson.a")
        event: dict[str, Any] = json.loads(live.next_line('"triggered"'))
        assert event["subject"] == "wjson.a" and event["revision"] > 0
    finally:
        assert live.stop(signal.SIGTERM) == 0, live.err


def test_history_follow_shows_runs_live(cli: Cli) -> None:
    cli.ok("add", "follow.job", "1h")
    cli.ok("trigger", "follow.job")
    live = Live(cli, "history", "follow.job", "--follow")
    try:
        header = live.next_line("SCHEDULED")
        assert "OUTCOME" in header
        old = live.next_line("fired")  # the run from before, then live ones
        live.wait_err("following runs")
        cli.ok("trigger", "follow.job")
        new = live.next_line("fired")
        assert new != old and "cli-live-a" in new
    finally:
        assert live.stop(signal.SIGINT) == 0, live.err


def test_history_follow_a_pattern_as_json(cli: Cli) -> None:
    cli.ok("add", "fpat.one", "1h")
    cli.ok("add", "fpat.two", "1h")
    live = Live(cli, "history", "fpat.>", "--follow", "--json")
    try:
        live.wait_err("following runs")
        cli.ok("trigger", "fpat.two")
        run = json.loads(live.next_line("fpat.two"))
        assert run["outcome"] == "fired" and run["subject"] == "fpat.two"
        cli.ok("trigger", "fpat.one")
        assert json.loads(live.next_line("fpat.one"))["subject"] == "fpat.one"
    finally:
        assert live.stop(signal.SIGTERM) == 0, live.err


def test_history_of_a_pattern_needs_follow(cli: Cli) -> None:
    result = cli.fails(2, "history", "fpat.>")
    assert "--follow" in result.err


def test_a_follower_ends_with_exit_4_when_the_server_goes(tmp_path: Path) -> None:
    server = EmbeddedNatsServer(tmp_path / "js").start()
    svc = start_service(server, "cli-live-gone")
    try:
        xdg = tmp_path / "xdg"
        xdg.mkdir()
        cli = Cli(cli_env(xdg, server.url))
        live = Live(cli, "list", "--watch")
        live.wait_err("watching for changes")
        server.stop()
        assert live.proc.wait(15) == 4
        assert any("lost the connection" in line for line in live.err), live.err
    finally:
        svc.proc.stop()
        server.stop()
