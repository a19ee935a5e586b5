"""The leader's progress mark: "every slot due up to T was handled", one KV key, and the proof
that the fires before it reached the server.

The mark lives in the leader bucket (key `progress`, no TTL) as JSON: `handled` (T, unix
microseconds), `applied` (the jobs stream's sequence the leader's copy held when it
processed up to T), `epoch` and `instance`. A leader writes it every ~200 ms while it fires,
with a compare-and-set on its previous write, so a deposed leader's late write fails.

The write goes through the `Wire` (straight to the socket, behind the fires), and its
acknowledgement is checked against the connection's generation: the server stores the
mark only after it processed every earlier message of the same TCP stream, and a mark
written under one generation is never re-sent on a later connection. So a stored mark
proves that the fires it covers reached the server, which is the confirmation a core
publish lacks; fires after the last stored mark are fired again by the next leader
(at least once per slot; the same `Nats-Msg-Id`, so a deduplicating stream keeps one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from nats_apscheduler._wire import Wire, headers, hpub
from nats_apscheduler.agenda import Mark
from nats_apscheduler.errors import MarkTakenOver
from nats_apscheduler.protocol import EXPECTED_LAST, WRONG_LAST_SEQUENCE, is_kv_delete

PROGRESS_KEY = "progress"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


@dataclass(frozen=True)
class Stored:
    """A mark as read from KV, with the revision to compare-and-set against."""

    mark: Mark | None
    epoch: int
    instance: str | None
    revision: int


class Progress:
    """Reads and writes the progress mark of one leader bucket on one connection."""

    def __init__(self, nc: Client, bucket: str, wire: Wire, key: str = PROGRESS_KEY) -> None:
        self._nc = nc
        self._wire = wire
        self.bucket = bucket
        self.subject = f"$KV.{bucket}.{key}"
        self._inbox = ""
        self._sub: Any = None
        self._seq = 0
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self.revision = 0  #: revision of the last mark this instance read or wrote
        self.writes = 0

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox() + "."
        self._sub = await self._nc.subscribe(self._inbox + "*", cb=self._on_reply)

    async def stop(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._sub.unsubscribe()
            self._sub = None

    async def read(self) -> Stored:
        """The mark as the stream leader holds it (a direct get may come from a replica that
        lags behind, and an old mark would make the next term fire slots again)."""
        try:
            msg = await self._nc.jetstream().get_msg(
                f"KV_{self.bucket}", subject=self.subject, direct=False
            )
        except nats.js.errors.NotFoundError:
            return Stored(None, 0, None, 0)
        revision = int(msg.seq or 0)
        if is_kv_delete(msg.headers):
            return Stored(None, 0, None, revision)
        return decode(msg.data, revision)

    async def write(
        self, mark: Mark, epoch: int, instance: str, fence: Any, timeout: float = 2.0
    ) -> bool:
        """Store `mark` (compare-and-set on `self.revision`); True once stored on the same
        connection as everything written before. False: not known to be stored (connection
        lost, fenced, no answer in time). Raises MarkTakenOver if another leader wrote."""
        if self._sub is None or not fence():
            return False
        generation = self._wire.generation()
        self._seq += 1
        token = str(self._seq)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        command = hpub(
            self.subject,
            self._inbox + token,
            headers([(EXPECTED_LAST, str(self.revision))]),
            encode(mark, epoch, instance),
        )
        try:
            if not fence():
                return False
            self._wire.write([command], messages=1)
        except ConnectionError:
            self._pending.pop(token, None)
            return False
        try:
            reply = await asyncio.wait_for(future, timeout)
        except (TimeoutError, asyncio.CancelledError):
            self._pending.pop(token, None)
            return False
        if self._wire.generation() != generation:
            return False
        error = reply.get("error") if isinstance(reply, dict) else None
        if error is not None:
            if error.get("err_code") in WRONG_LAST_SEQUENCE:
                raise MarkTakenOver(str(error.get("description")))
            return False
        try:
            self.revision = int(reply["seq"])
        except (KeyError, TypeError, ValueError):
            return False
        self.writes += 1
        return True

    async def _on_reply(self, msg: Msg) -> None:
        future = self._pending.pop(msg.subject[len(self._inbox) :], None)
        if future is None or future.done():
            return
        try:
            future.set_result(json.loads(msg.data))
        except ValueError:
            future.set_result({"error": {"description": "unreadable acknowledgement"}})


def encode(mark: Mark, epoch: int, instance: str) -> bytes:
    return json.dumps(
        {
            "handled": (mark.handled - _EPOCH) // _US,
            "applied": mark.applied,
            "epoch": epoch,
            "instance": instance,
        },
        separators=(",", ":"),
    ).encode()


def decode(data: bytes | None, revision: int) -> Stored:
    """A stored mark; an unreadable one counts as none (the next term then fires each job's
    latest slot within grace again, which at worst repeats slots, never loses one)."""
    try:
        value = json.loads(data or b"")
        handled = _EPOCH + int(value["handled"]) * _US
        applied = int(value["applied"])
        epoch = int(value.get("epoch") or 0)
        instance = value.get("instance")
    except (ValueError, TypeError, KeyError, OverflowError, OSError):
        return Stored(None, 0, None, revision)
    return Stored(Mark(handled, applied), epoch, str(instance) if instance else None, revision)
