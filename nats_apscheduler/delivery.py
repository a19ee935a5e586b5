"""Requests and JetStream publishes in flight: one reply subscription per instance, their
deadlines, and the outcome a reply (or its absence) means.

A fire of a job in `request` or `jetstream` mode leaves in its slice's one socket write like
any other fire (behind the fence), with a reply subject `<inbox>.<n>` under this instance's
one wildcard subscription (`reply_subject()`); `track()` registers it right after that
write, before the loop can deliver a reply. Its reply, the server's no-responders status, or
its deadline settles it: the run's `RunOwner` is told the `Outcome`, once.

- request: a reply without error headers is `succeeded`; one carrying the micro error
  headers (`Nats-Service-Error`, `Nats-Service-Error-Code`) is `failed`; the server's 503
  status (nobody subscribes to the subject) is `no_responders`; no reply in time, `timeout`.
- jetstream: the stream's PubAck is `stored` (with stream and sequence; a duplicate
  `Nats-Msg-Id` within the stream's window is acknowledged with `duplicate: true`, and the
  message is stored already: also `stored`); an error ack, the 503 status (no stream
  captures the subject) or no ack in time is `failed`.

Deadlines cost no timer per request: runs are kept in one queue per timeout value (so each
queue is ordered by deadline) and one loop timer is armed for the earliest head.
Knows nothing of jobs, fires or the fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import nats.errors
from loguru import logger
from nats.aio.client import Client
from nats.aio.msg import Msg

from nats_apscheduler.durations import format_duration
from nats_apscheduler.protocol import (
    DESCRIPTION_HEADER,
    SERVICE_ERROR,
    SERVICE_ERROR_CODE,
    STATUS_HEADER,
)

REPLY_KEPT = 1024  #: bytes of a reply recorded with its run
NO_RESPONDERS = "503"
#: Outcomes that mean the work was handed over (the others are failures).
SUCCESS = frozenset({"succeeded", "stored"})
FAILURE = frozenset({"failed", "timeout", "no_responders"})


@dataclass(slots=True)
class Outcome:
    """How one delivery attempt ended."""

    outcome: str  #: succeeded, failed, timeout, no_responders (request); stored, failed (jetstream)
    duration: float  #: seconds from the write to the reply (or the deadline)
    error: str | None = None
    reply: bytes | None = None  #: the first REPLY_KEPT bytes of a request's reply
    stream: str | None = None  #: jetstream: where it was stored
    seq: int | None = None
    duplicate: bool = False  #: jetstream: the stream had this Nats-Msg-Id already

    @property
    def ok(self) -> bool:
        return self.outcome in SUCCESS


class RunOwner(Protocol):
    """Told how a tracked run's attempt ended (the firer of the term that sent it)."""

    def settle(self, run: Any, outcome: Outcome) -> None: ...


@dataclass(slots=True)
class _Pending:
    run: Any
    owner: RunOwner
    mode: str
    timeout: float
    started: float  # loop time of the write


class Deliveries:
    """The in-flight requests and JetStream publishes of one instance (every term's)."""

    def __init__(self, nc: Client, limit: int) -> None:
        self._nc = nc
        self.limit = limit  #: at most this many in flight (see `room()`)
        self._inbox = ""
        self._sub: Any = None
        self._seq = 0
        self._pending: dict[str, _Pending] = {}
        self._queues: dict[float, deque[tuple[float, str]]] = {}  # timeout -> (deadline, token)
        self._timer: asyncio.TimerHandle | None = None
        self.replies = 0  #: replies that settled a run
        self.timeouts = 0
        self.late = 0  #: replies after their run had timed out (or was dropped)

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox() + "."
        self._sub = await self._nc.subscribe(
            self._inbox + "*", cb=self._on_reply, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    async def stop(self) -> int:
        """Stop listening; returns the runs still in flight, whose outcomes are not known."""
        dropped = len(self._pending)
        self._pending.clear()
        self._queues.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._sub.unsubscribe()
            self._sub = None
        return dropped

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def room(self) -> int:
        """How many more runs may be sent before the bound is reached."""
        return self.limit - len(self._pending)

    def reply_subject(self) -> str:
        """A fresh reply subject for one attempt (`track` it once written)."""
        self._seq += 1
        return f"{self._inbox}{self._seq}"

    def track(self, reply: str, run: Any, owner: RunOwner, mode: str, timeout: float) -> None:
        """`run` was written with reply subject `reply`: wait for its reply or deadline."""
        token = reply[len(self._inbox) :]
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._pending[token] = _Pending(run, owner, mode, timeout, now)
        deadline = now + timeout
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = deque()
        queue.append((deadline, token))
        if self._timer is None or deadline < self._timer.when():
            self._arm(loop)

    # --- replies and deadlines ----------------------------------------------------------------

    async def _on_reply(self, msg: Msg) -> None:
        pending = self._pending.pop(msg.subject[len(self._inbox) :], None)
        if pending is None:
            self.late += 1
            return
        self.replies += 1
        duration = asyncio.get_running_loop().time() - pending.started
        outcome = classify(pending.mode, msg.headers, msg.data, duration)
        _settle(pending, outcome)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        heads = [queue[0][0] for queue in self._queues.values() if queue]
        if heads:
            self._timer = loop.call_at(min(heads), self._expire)

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired: list[_Pending] = []
        for timeout, queue in list(self._queues.items()):
            while queue and queue[0][0] <= now:
                _, token = queue.popleft()
                pending = self._pending.pop(token, None)
                if pending is not None:  # not answered meanwhile
                    expired.append(pending)
            if not queue:
                del self._queues[timeout]
        for pending in expired:
            self.timeouts += 1
            _settle(pending, timed_out(pending.mode, pending.timeout))
        self._arm(loop)


def _settle(pending: _Pending, outcome: Outcome) -> None:
    try:
        pending.owner.settle(pending.run, outcome)
    except Exception as exc:  # one run's bookkeeping must never stop the others'
        logger.opt(exception=exc).error("recording the outcome of a run failed: {}", exc)


def timed_out(mode: str, timeout: float) -> Outcome:
    text = format_duration(timedelta(seconds=timeout))
    if mode == "jetstream":
        return Outcome("failed", timeout, f"no PubAck within {text}")
    return Outcome("timeout", timeout, f"no reply within {text}")


def classify(mode: str, headers: dict[str, str] | None, data: bytes, duration: float) -> Outcome:
    """The outcome a reply means for a run of `mode` (see the module docstring)."""
    headers = headers or {}
    status = headers.get(STATUS_HEADER)
    if mode == "jetstream":
        return _pub_ack(status, headers, data, duration)
    if status == NO_RESPONDERS:
        return Outcome("no_responders", duration, "no responders: nobody subscribes to the subject")
    kept = data[:REPLY_KEPT]
    code = headers.get(SERVICE_ERROR_CODE)
    error = headers.get(SERVICE_ERROR)
    if code or error:
        text = " ".join(part for part in (code, error) if part)
        return Outcome("failed", duration, text, reply=kept)
    if status and status != "200" and not data:
        # A server status other than no-responders (e.g. 408, 409): not a worker's reply.
        # nats-py keys the description with an Enum whose hash is not the string's.
        description = next((v for k, v in headers.items() if k == DESCRIPTION_HEADER), "")
        return Outcome("failed", duration, f"status {status} {description}".strip(), reply=kept)
    return Outcome("succeeded", duration, reply=kept)


def _pub_ack(status: str | None, headers: dict[str, str], data: bytes, duration: float) -> Outcome:
    if status == NO_RESPONDERS:
        return Outcome("failed", duration, "no stream captures the subject (no responders)")
    try:
        ack = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        ack = None
    if not isinstance(ack, dict):
        snippet = data[:200].decode("utf-8", "replace")
        return Outcome("failed", duration, f"not a PubAck: {snippet!r}")
    error = ack.get("error")
    if error is not None:
        if isinstance(error, dict):
            text = f"{error.get('code', '')} {error.get('description', '')}".strip()
            if error.get("err_code"):
                text += f" (err_code {error['err_code']})"
        else:
            text = str(error)
        return Outcome("failed", duration, f"JetStream: {text}")
    stream, seq = ack.get("stream"), ack.get("seq")
    if not isinstance(stream, str) or not isinstance(seq, int) or isinstance(seq, bool):
        return Outcome("failed", duration, f"PubAck without stream and sequence: {ack!r}"[:300])
    return Outcome("stored", duration, stream=stream, seq=seq, duplicate=bool(ack.get("duplicate")))
