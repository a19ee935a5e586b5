"""Compare-and-set KV writes, pipelined: many in flight, one reply subscription.

Every job store write is a JetStream publish with `Nats-Expected-Last-Subject-Sequence`.
nats-py's `kv.update()` sends each one as a request: a NUID token, a future, an
`asyncio.wait_for` with its own timer, and a `PubAck` dataclass per write. On the fire path
that machinery cost more CPU than the write itself (bench/fire_ceiling.py --profile).
`KVWrites.send()` publishes a whole batch with numbered reply subjects under one
subscription, then waits for all replies under a single timer.

The outcome of each write is its new revision, or the exception `kv.update()` would raise:
`KeyWrongLastSequenceError` (the compare-and-set failed), another `APIError`, or
`NoRespondersError` / `TimeoutError` (the stream is unreachable: the write may or may not
have happened, so the caller retries it against the revision it knows and resolves a
conflict by reloading).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from nats_apscheduler.protocol import EXPECTED_LAST, KV_DEL, KV_OP, WRONG_LAST_SEQUENCE

_STATUS = "Status"

Outcome = int | BaseException


@dataclass
class _Batch:
    outcomes: list[Outcome | None]
    remaining: int
    done: asyncio.Future[None] = field(default_factory=asyncio.Future)


class KVWrites:
    """Pipelined compare-and-set puts and deletes on one KV bucket of one connection."""

    def __init__(self, nc: Client, bucket: str, timeout: float = 5.0) -> None:
        self._nc = nc
        self._prefix = f"$KV.{bucket}."
        self.timeout = timeout
        self._inbox = ""
        self._sub: Any = None
        self._seq = 0
        self._pending: dict[str, tuple[_Batch, int]] = {}  # reply token -> (batch, index)

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox() + "."
        self._sub = await self._nc.subscribe(self._inbox + "*", cb=self._on_reply)

    async def stop(self) -> None:
        for batch, index in list(self._pending.values()):
            _settle(batch, index, nats.errors.ConnectionClosedError())
        self._pending.clear()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._sub.unsubscribe()
            self._sub = None

    async def send(self, writes: list[tuple[str, bytes | None, int]]) -> list[Outcome]:
        """Write each (key, value or None to delete, expected last revision, 0: none).

        Returns one outcome per write, in order: the new revision or the exception.
        """
        if not writes:
            return []
        if self._sub is None:
            raise nats.errors.ConnectionClosedError()
        batch = _Batch([None] * len(writes), len(writes))
        tokens = [str(self._seq + n) for n in range(1, len(writes) + 1)]
        self._seq += len(writes)
        for index, token in enumerate(tokens):
            self._pending[token] = (batch, index)
        index = 0
        try:
            for index, (key, value, last) in enumerate(writes):
                headers = {EXPECTED_LAST: str(last)}
                if value is None:
                    headers[KV_OP] = KV_DEL
                await self._nc.publish(
                    self._prefix + key,
                    value or b"",
                    reply=self._inbox + tokens[index],
                    headers=headers,
                )
        except (nats.errors.Error, OSError) as exc:
            for unsent in range(index, len(writes)):  # the earlier ones may still be acked
                self._pending.pop(tokens[unsent], None)
                _settle(batch, unsent, exc)
        if batch.remaining:
            # One timer for the batch (not asyncio.wait_for: a timer, a shield future and
            # their callbacks per batch, on the fire path).
            timer = asyncio.get_running_loop().call_later(self.timeout, _expire, batch)
            try:
                await batch.done
            finally:
                timer.cancel()
        for index, token in enumerate(tokens):
            if self._pending.pop(token, None) is not None:  # no reply in time
                _settle(batch, index, nats.errors.TimeoutError())
        return [outcome for outcome in batch.outcomes if outcome is not None]

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject[len(self._inbox) :], None)
        if entry is not None:
            _settle(entry[0], entry[1], _outcome(msg))


def _outcome(msg: Msg) -> Outcome:
    if msg.headers and msg.headers.get(_STATUS) == "503":
        return nats.js.errors.NoStreamResponseError()
    try:
        reply = json.loads(msg.data)
    except ValueError as exc:
        return nats.js.errors.APIError(description=f"unreadable publish ack ({exc})")
    error = reply.get("error") if isinstance(reply, dict) else None
    if error is not None:
        if error.get("err_code") in WRONG_LAST_SEQUENCE:
            return nats.js.errors.KeyWrongLastSequenceError(description=error.get("description"))
        try:
            nats.js.errors.APIError.from_error(error)
        except nats.js.errors.APIError as exc:
            return exc
    try:
        return int(reply["seq"])
    except (KeyError, TypeError, ValueError):
        return nats.js.errors.APIError(description=f"publish ack without a sequence: {reply!r}")


def _expire(batch: _Batch) -> None:
    if not batch.done.done():
        batch.done.set_result(None)  # the writes still unanswered time out


def _settle(batch: _Batch, index: int, outcome: Outcome) -> None:
    if batch.outcomes[index] is not None:
        return
    batch.outcomes[index] = outcome
    batch.remaining -= 1
    if batch.remaining == 0 and not batch.done.done():
        batch.done.set_result(None)
