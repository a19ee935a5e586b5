"""Test harness: real `nats-cron serve` processes and a subscriber that counts fires."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg


class ServeProcess:
    """One `python -m nats_cron_cli serve` child; its JSON log lines are collected."""

    def __init__(self, instance_id: str, env: dict[str, str], args: list[str] | None = None):
        self.instance_id = instance_id
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        full_env = {**os.environ, **env, "INSTANCE_ID": instance_id}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nats_cron_cli", "serve", *(args or [])],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.raw.append(line)
                with contextlib.suppress(ValueError):  # a non-JSON line (e.g. a traceback)
                    self.lines.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def count(self, msg: str) -> int:
        with self._cond:
            return sum(1 for line in self.lines if str(line.get("msg", "")).startswith(msg))

    def find(self, msg: str) -> list[dict[str, Any]]:
        with self._cond:
            return [line for line in self.lines if str(line.get("msg", "")).startswith(msg)]

    def wait_for(self, msg: str, count: int = 1, timeout: float = 15.0) -> dict[str, Any]:
        """Block (in a thread) until `msg` was logged `count` times; returns the last."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines if str(line.get("msg", "")).startswith(msg)]
                if len(found) >= count:
                    return found[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not found):
                    tail = "".join(self.raw[-15:])
                    raise TimeoutError(
                        f"{self.instance_id}: no {msg!r} x{count}; log tail:\n{tail}"
                    )
                self._cond.wait(min(remaining, 0.2))

    async def await_log(self, msg: str, count: int = 1, timeout: float = 15.0) -> dict[str, Any]:
        return await asyncio.to_thread(self.wait_for, msg, count, timeout)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    async def wait_exit(self, timeout: float = 15.0) -> int:
        """The exit code, once every line the child logged has been read (the pipe is
        read by a thread that may trail the exit)."""
        code = await asyncio.to_thread(self.proc.wait, timeout)
        await asyncio.to_thread(self._pumping.join, 5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._pumping.join(5)  # every line logged before the exit is in `lines`


@dataclass
class Fire:
    subject: str
    msg_id: str
    instance: str
    epoch: int
    scheduled: datetime
    received: float  # time.time()
    data: bytes
    shard: int = 0


@dataclass
class FireRecorder:
    """Counts every fire arriving at a core subscription, by `Nats-Msg-Id`."""

    fires: list[Fire] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def subscribe(self, nc: Client, subject: str) -> None:
        await nc.subscribe(subject, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers or {}
        fire = Fire(
            subject=msg.subject,
            msg_id=headers.get("Nats-Msg-Id", ""),
            instance=headers.get("Nats-Cron-Instance", ""),
            epoch=int(headers.get("Nats-Cron-Epoch", "0")),
            scheduled=datetime.fromisoformat(headers["Nats-Cron-Scheduled"]),
            received=time.time(),
            data=msg.data,
            shard=int(headers.get("Nats-Cron-Shard", "0")),
        )
        async with self._changed:
            self.fires.append(fire)
            self._changed.notify_all()

    async def wait(self, predicate: Callable[[list[Fire]], bool], timeout: float = 15.0) -> None:
        async def check() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.fires))

        try:
            await asyncio.wait_for(check(), timeout)
        except TimeoutError:
            summary = [
                (f.subject, f.instance, f.epoch, f.scheduled.isoformat()) for f in self.fires[-10:]
            ]
            raise AssertionError(
                f"condition not met within {timeout}s; last fires: {summary}"
            ) from None

    def duplicates(self) -> list[str]:
        seen: dict[str, int] = {}
        for fire in self.fires:
            seen[fire.msg_id] = seen.get(fire.msg_id, 0) + 1
        return [msg_id for msg_id, n in seen.items() if n > 1]

    def of(self, subject: str) -> list[Fire]:
        return [f for f in self.fires if f.subject == subject]
