"""`serve --embedded` and `EmbeddedNatsServer` with real processes: the child nats-server
dies with its parent (even on SIGKILL), one data directory serves one embedded server
(refused with the cause first, before the store is opened), and the child's log kept in
memory is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nats_apscheduler.embedded import LOCK_FILE, EmbeddedNatsServer
from nats_apscheduler.errors import DataDirInUse
from tests.helpers.cli_run import CRED_VARS
from tests.helpers.waiting import eventually_blocking

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Embedded:
    """`python -m nats_cron_cli serve --embedded --embedded-port 0` on a data directory."""

    def __init__(self, data_dir: Path, name: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in CRED_VARS and k != "NATS_URL"}
        env.update(INSTANCE_ID=name, NATS_CRON_JOBS_BUCKET=f"{name}-jobs", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nats_cron_cli", "serve", "--embedded", "--embedded-port",
             "0", "--data-dir", str(data_dir), "--log-format", "json"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.lines: list[str] = []

    def wait_started(self, timeout: float = 20.0) -> str:
        """The embedded server's URL, once the instance has started."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        url = None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = re.search(r"embedded nats-server with JetStream on (\S+)", line)
            if match:
                url = match.group(1)
            if "nats-cron instance started" in line:
                assert url is not None
                return url
            assert time.monotonic() < deadline, "".join(self.lines)
        raise AssertionError("serve --embedded ended:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def started() -> Iterator[list[Embedded]]:
    procs: list[Embedded] = []
    yield procs
    for proc in procs:
        proc.stop()


def test_kill_9_of_serve_takes_its_nats_server_along(tmp_path: Path, started: list[Embedded]):
    first = Embedded(tmp_path / "data", "emb-1")
    started.append(first)
    first.wait_started()
    servers = children(first.proc.pid)
    assert len(servers) == 1, servers
    server = servers[0]
    assert "nats-server" in Path(f"/proc/{server}/cmdline").read_text()

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    eventually_blocking(lambda: not alive(server), 10, f"nats-server {server} to exit", 0.05)

    # The data directory is free again: the next one starts on it.
    second = Embedded(tmp_path / "data", "emb-2")
    started.append(second)
    second.wait_started()


def test_a_second_embedded_server_on_one_data_directory_is_refused(
    tmp_path: Path, started: list[Embedded]
):
    first = Embedded(tmp_path / "data", "emb-1")
    started.append(first)
    first.wait_started()
    (tmp_path / "data" / "jetstream").stat()  # the first one's store exists

    second = Embedded(tmp_path / "data", "emb-2")
    started.append(second)
    code = second.proc.wait(15)
    assert second.proc.stderr is not None
    err = second.proc.stderr.read()
    assert code == 1, err
    first_line = err.strip().splitlines()[0]
    assert first_line.startswith("error: the data directory "), err
    assert "in use by another embedded nats-server" in first_line
    assert f"pid {first.proc.pid}" in first_line
    assert "Traceback" not in err and "nats-cron instance started" not in err
    # It never started a server of its own, and the first one is unharmed.
    assert first.proc.poll() is None and len(children(first.proc.pid)) == 1


def test_the_lock_outlives_the_parent_while_the_server_runs(tmp_path: Path) -> None:
    """The child holds the lock too: as long as a server runs on the directory, even one
    whose parent is gone, nobody else starts on it."""
    server = EmbeddedNatsServer(tmp_path / "js", lock_wait=0.2).start()
    try:
        assert (tmp_path / "js" / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(DataDirInUse, match="in use by another embedded nats-server"):
            EmbeddedNatsServer(tmp_path / "js", lock_wait=0.2).start()
    finally:
        server.stop()
    again = EmbeddedNatsServer(tmp_path / "js", lock_wait=0.2).start()
    again.stop()


def test_the_cause_of_a_failed_start_comes_first(tmp_path: Path) -> None:
    busy = EmbeddedNatsServer(tmp_path / "a").start()
    try:
        with pytest.raises(RuntimeError) as caught:
            EmbeddedNatsServer(tmp_path / "b", port=busy.port).start()
    finally:
        busy.stop()
    message = str(caught.value)
    assert "address already in use" in message.splitlines()[0], message


def test_the_child_log_kept_in_memory_is_bounded(tmp_path: Path) -> None:
    server = EmbeddedNatsServer(tmp_path / "js", log_lines=5, extra_args=["-D"]).start()
    try:
        assert len(server.log) == 5
        assert any("Server is ready" in line for line in server.log)
    finally:
        server.stop()
    assert EmbeddedNatsServer(tmp_path / "x").log.maxlen == 1000
