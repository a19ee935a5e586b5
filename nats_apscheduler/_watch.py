"""A stream watch (the last message per subject, then every new one) that keeps up across
server restarts, node deaths and reconnects; `KVFeed` is its form for a KV bucket.

nats-py's `kv.watch()` is an ordered consumer with a 5 s idle heartbeat that resets only
after two missed heartbeats, so after a server restart (or the death of the cluster node
holding its consumer) it goes silent for 10-20 s. `Feed` is the same ordered consumer
with a 1 s heartbeat that also resumes at once, from the stream sequence after the last
one it delivered, whenever the connection reconnects or its owner asks (`resume()`).
Entries at or below that sequence are dropped, so a resume never repeats one.
`catch_up()` waits until it has delivered everything the stream holds now.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import nats.errors
import nats.js.errors
from loguru import logger
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.kv import KeyValue

from nats_apscheduler._gate import LevelGate
from nats_apscheduler._tasks import cancel_and_wait
from nats_apscheduler.protocol import KV_MARKER_REASON, KV_OP

_MARKER_OPS = {"MaxAge": "PURGE", "Purge": "PURGE", "Remove": "DEL"}
_RECONNECT_POLL = 0.1  # seconds between looks at the connection's reconnect counter
_RETRY = 0.25  # seconds between attempts to re-create the consumer
_CATCH_UP_RETRY = 0.05  # seconds between reads of the stream's state while it has no leader
_TURN = 0.005  # seconds the callback may hold the loop before it yields


class Feed:
    """Messages of `prefix` + `keys` in `stream`, in stream order, as `KeyValue.Entry`s (the
    key is the subject without `prefix`); `None` once the initial state is in.

    Iterate with `async for entry in feed` after `await feed.start()`, or pass `handler`:
    it is then called with each entry straight from the subscription's callback (no queue
    and no task switch per entry; the job store's hot path), and must not raise.
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        prefix: str,
        keys: str = ">",
        heartbeat: float = 1.0,
        handler: Callable[[KeyValue.Entry | None], None] | None = None,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.bucket = stream
        self._stream = stream
        self._prefix = prefix
        self._subject = self._prefix + keys
        self._heartbeat = heartbeat
        self._queue: asyncio.Queue[KeyValue.Entry | None] = asyncio.Queue()
        self._deliver = handler or self._queue.put_nowait
        self._sub: Any = None
        self._generation = 0  # which subscription a callback belongs to
        self._loaded = False
        self._reconnects = 0
        self._guard: asyncio.Task[None] | None = None
        self._resuming: asyncio.Task[None] | None = None
        self.last_seq = 0  #: the stream sequence of the last entry delivered
        self.resumes = 0  #: how often the consumer was re-created
        self._delivered = LevelGate()
        self._turn = time.perf_counter()  # when the callback last yielded to the loop

    async def start(self) -> None:
        self._reconnects = self._reconnect_count()
        await self._subscribe()
        self._guard = asyncio.get_running_loop().create_task(
            self._follow_reconnects(), name=f"kv-feed-{self.bucket}"
        )

    async def stop(self) -> None:
        # A plain cancel can be lost while _resume() waits for a reply (see _tasks); it
        # would then retry subscribing for as long as NATS is away.
        await cancel_and_wait([self._guard, self._resuming])
        await self._unsubscribe()

    def __aiter__(self) -> Feed:
        return self

    async def __anext__(self) -> KeyValue.Entry | None:
        return await self._queue.get()

    async def catch_up(self, timeout: float) -> bool:
        """Wait until every message the stream holds now has been delivered; False on timeout.

        The stream's last sequence is read first (retried while the stream has no leader,
        right after a node restart); a watch that makes no progress for a moment is
        re-created from where it stopped (its consumer is probably gone).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            try:
                info = await asyncio.wait_for(
                    self._js.stream_info(self._stream), max(remaining, 0.01)
                )
                break
            except (nats.errors.Error, TimeoutError) as exc:
                if deadline - loop.time() <= _CATCH_UP_RETRY:
                    logger.bind(stream=self._stream).warning(
                        "cannot check the watch of {}: {}", self._stream, _describe(exc)
                    )
                    return False
                await asyncio.sleep(_CATCH_UP_RETRY)
        target = int(info.state.last_seq)
        stall = min(0.5, timeout / 4)
        while self.last_seq < target:
            remaining = deadline - loop.time()
            if remaining <= 0:
                logger.bind(stream=self._stream).warning(
                    "watch of {} still behind ({} < {})", self._stream, self.last_seq, target
                )
                return False
            seen = self.last_seq
            await self._delivered.wait(target, min(stall, remaining))
            if self.last_seq == seen:
                self.resume()
        return True

    def resume(self) -> None:
        """Re-create the consumer from the sequence after the last entry delivered."""
        if self._resuming is None or self._resuming.done():
            self._resuming = asyncio.get_running_loop().create_task(
                self._resume(), name=f"kv-feed-resume-{self.bucket}"
            )

    # --- internals ----------------------------------------------------------------------------

    def _reconnect_count(self) -> int:
        return int(self._nc.stats.get("reconnects", 0))

    async def _follow_reconnects(self) -> None:
        # nats-py has one reconnected callback and it belongs to the application: watch
        # its counter instead (a cheap dict read).
        while True:
            await asyncio.sleep(_RECONNECT_POLL)
            count = self._reconnect_count()
            if count != self._reconnects and self._nc.is_connected:
                self._reconnects = count
                self.resume()

    async def _resume(self) -> None:
        while True:
            await self._unsubscribe()
            try:
                await self._subscribe()
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                # E.g. the stream has no leader yet after a node restart.
                logger.bind(bucket=self.bucket).debug("re-creating the KV watch: {}", exc)
                await asyncio.sleep(_RETRY)
                continue
            self.resumes += 1
            return

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()

    async def _subscribe(self) -> None:
        self._generation += 1
        generation = self._generation
        if self.last_seq:
            config = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.last_seq + 1
            )
        else:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)

        async def on_msg(msg: Msg) -> None:
            if generation == self._generation:
                self._on_msg(msg)
                # nats-py hands a subscription's queued messages to its callback one after
                # the other without yielding: a burst of 10,000 changes would hold the loop
                # (the lease refresh, the fires) for the whole burst. Yield every 5 ms.
                if time.perf_counter() - self._turn > _TURN:
                    await asyncio.sleep(0)
                    self._turn = time.perf_counter()

        sub = await self._js.subscribe(
            self._subject,
            stream=self._stream,
            cb=on_msg,
            config=config,
            ordered_consumer=True,
            idle_heartbeat=self._heartbeat,
            inactive_threshold=300,
        )
        self._sub = sub
        if not self._loaded:
            info = await sub.consumer_info()
            # Empty only if the server delivered nothing: its reply can overtake entries it
            # delivered before answering (our own `sub.delivered` was still 0 then). Those
            # arrive, the last with nothing pending, and mark the load done (_on_msg).
            delivered = info.delivered.consumer_seq if info.delivered else 0
            if info.num_pending == 0 and delivered == 0 and not self._loaded:
                self._mark_loaded()

    def _on_msg(self, msg: Msg) -> None:
        seq, pending = _position(msg)
        if seq > self.last_seq:
            self.last_seq = seq
            if len(self._delivered):
                self._delivered.raise_to(seq)
            headers = msg.headers or {}
            op = headers.get(KV_OP)
            if op is None and KV_MARKER_REASON in headers:
                op = _MARKER_OPS.get(headers[KV_MARKER_REASON], "PURGE")
            self._deliver(
                KeyValue.Entry(
                    bucket=self.bucket,
                    key=msg.subject[len(self._prefix) :],
                    value=msg.data,
                    revision=seq,
                    delta=pending,
                    created=None,
                    operation=op,
                )
            )
        if not self._loaded and pending == 0:
            self._mark_loaded()

    def _mark_loaded(self) -> None:
        self._loaded = True
        self._deliver(None)


class KVFeed(Feed):
    """Entries of `keys` in a KV bucket (see `Feed`)."""

    def __init__(
        self,
        nc: Client,
        bucket: str,
        keys: str = ">",
        heartbeat: float = 1.0,
        handler: Callable[[KeyValue.Entry | None], None] | None = None,
    ) -> None:
        super().__init__(nc, f"KV_{bucket}", f"$KV.{bucket}.", keys, heartbeat, handler)
        self.bucket = bucket


def _describe(exc: BaseException) -> str:
    """An exception's message, or its type when it has none (nats-py's TimeoutError)."""
    return str(exc) or type(exc).__name__


def _position(msg: Msg) -> tuple[int, int]:
    """(stream sequence, messages pending) of a consumer's message, from its reply subject.

    The common form is parsed here (`msg.metadata` builds a dataclass, a datetime and two
    more objects per message); any other goes through nats-py.
    """
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5]), int(tokens[8])
    meta = msg.metadata
    return int(meta.sequence.stream), int(meta.num_pending)
