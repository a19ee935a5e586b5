"""Publish confirmation: proof that what a connection published so far reached its server.

A core publish has no acknowledgement, and nats-py's `flush()` writes its PING straight
to the socket, ahead of publishes still queued in the client's buffer, so a PONG proves
nothing about them. A marker message to our own inbox subscription, published after
them, goes through the same buffer and the same TCP stream: when it comes back on the
same connection (no reconnect in between), the server has processed every earlier
publish.

The first confirmation of a loop turn publishes its marker at once, so that it leaves in
the same socket write as the publish it confirms (a fire at a time, the common case, then
costs one write and no task for the marker). Later confirmations in that turn share one
marker sent on the next turn, so a burst of fires still costs one marker. Measured at 500
and 1,000 fires/s, the service's CPU did not change beyond the noise (bench/fire_ceiling.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg


class Confirmer:
    """Group-confirms publishes of one connection; `await confirm()` after publishing."""

    def __init__(self, nc: Client, timeout: float = 2.0) -> None:
        self._nc = nc
        self.timeout = timeout
        self._subject = ""
        self._sub: Any = None
        self._seq = 0
        # marker number -> (connection generation when sent, waiters)
        self._waiting: dict[int, tuple[int, asyncio.Future[bool]]] = {}
        self._next: asyncio.Future[bool] | None = None  # waiters of the marker not yet sent
        self._turn_marked = False  # a marker went out inline in this loop turn
        self._tasks: set[asyncio.Task[None]] = set()
        self._lost = 0  # connection losses signalled by the owner (see connection_lost)

    async def start(self) -> None:
        self._subject = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._subject, cb=self._on_marker)

    async def stop(self) -> None:
        self._fail_all()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    def _generation(self) -> int:
        # nats-py counts reconnects itself; `_lost` moves on at the disconnect already.
        # Both only grow, so their sum changes whenever the connection did.
        return int(self._nc.stats.get("reconnects", 0)) + self._lost

    async def confirm(self) -> bool:
        """True once the server has processed everything this connection published before
        the call; False if the connection dropped meanwhile or no proof came in time (then
        an earlier publish may or may not have arrived)."""
        if self._sub is None or not self._nc.is_connected:
            return False
        loop = asyncio.get_running_loop()
        if not self._turn_marked:
            self._turn_marked = True
            loop.call_soon(self._end_turn)
            future = self._register(loop.create_future())
            await self._publish(self._seq)
            return await future  # this caller's own future: no shield needed
        if self._next is None:
            self._next = loop.create_future()
            loop.call_soon(self._send)
        # One future and one timer per marker, shared by its waiters (no per-fire timer).
        return await asyncio.shield(self._next)

    def _end_turn(self) -> None:
        self._turn_marked = False

    def connection_lost(self) -> None:
        """Call from the disconnected callback: every pending confirmation fails at once."""
        self._lost += 1
        self._fail_all()

    def _send(self) -> None:
        future, self._next = self._next, None
        if future is None or future.done():
            return
        self._register(future)
        task = asyncio.get_running_loop().create_task(self._publish(self._seq))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _register(self, future: asyncio.Future[bool]) -> asyncio.Future[bool]:
        """Number the next marker for `future`, with its timer."""
        self._seq += 1
        self._waiting[self._seq] = (self._generation(), future)
        timer = asyncio.get_running_loop().call_later(self.timeout, self._expire, self._seq)
        future.add_done_callback(lambda _: timer.cancel())
        return future

    def _expire(self, seq: int) -> None:
        entry = self._waiting.pop(seq, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(False)  # no proof in time

    async def _publish(self, seq: int) -> None:
        try:
            await self._nc.publish(self._subject, str(seq).encode())
        except (nats.errors.Error, OSError):
            self._resolve_upto(seq, ok=False)

    async def _on_marker(self, msg: Msg) -> None:
        try:
            seq = int(msg.data)
        except ValueError:
            return
        self._resolve_upto(seq, ok=True)

    def _resolve_upto(self, seq: int, ok: bool) -> None:
        # Markers come back in order: one arriving settles every earlier marker too (an
        # earlier one that never came back was lost in a reconnect: its generation differs).
        now = self._generation()
        for number in [n for n in self._waiting if n <= seq]:
            generation, future = self._waiting.pop(number)
            if not future.done():
                future.set_result(ok and generation == now)

    def _fail_all(self) -> None:
        pending = [future for _, future in self._waiting.values()]
        if self._next is not None:
            pending.append(self._next)
            self._next = None
        self._waiting.clear()
        for future in pending:
            if not future.done():
                future.set_result(False)
