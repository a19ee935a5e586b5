"""Leader election: a lease on one key of a KV bucket with a per-key TTL.

Knows nothing of APScheduler: it calls `on_won(epoch)` and `on_lost(reason)`.

- Win: create-if-absent with a per-message TTL (`Nats-TTL`); the epoch is the revision
  at which the lease was won (stream sequences only grow, so epochs do too).
- Hold: every ttl/3, a revision-checked rewrite with the TTL again. Each success moves
  the local deadline to `monotonic time when the refresh was sent + ttl - margin`. The
  server counts its TTL from when it stored the message, later than our send time, so
  our deadline passes before the key can expire and before anyone else can win.
- Fence: `is_leader_now()` is true only while holding, connected and before the deadline.
  A failed refresh that leaves the deadline behind, a lost connection or a frozen
  process (SIGSTOP: the monotonic clock keeps counting) all end leadership locally.
- Followers watch the key. The bucket has limit markers, so a lease that expires is
  pushed to them as a marker and they campaign at once; a clean `stop()` deletes the key
  (guarded by the held revision) for an immediate handover.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from loguru import logger
from nats.aio.client import Client
from nats.js.api import KeyValueConfig

from nats_apscheduler._tasks import cancel_and_wait
from nats_apscheduler._watch import KVFeed
from nats_apscheduler.protocol import (
    EXPECTED_LAST,
    KV_DEL,
    KV_MARKER_REASON,
    KV_OP,
    WRONG_LAST_SEQUENCE,
    is_kv_delete,
)

LEASE_KEY = "leader"


@dataclass(frozen=True)
class LeaderInfo:
    instance_id: str
    since: str  # RFC 3339
    epoch: int

    def to_dict(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "since": self.since, "epoch": self.epoch}


class Election:
    """One candidate in the election on `bucket`. Run it on the connection's loop."""

    def __init__(
        self,
        nc: Client,
        bucket: str,
        instance_id: str,
        ttl: float = 3.0,
        *,
        replicas: int = 1,
        margin: float | None = None,
        on_won: Callable[[int], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        key: str = LEASE_KEY,
        eligible: Callable[[], bool] = lambda: True,
    ) -> None:
        """`key`: the lease's key in the bucket (one per shard); `eligible()` is asked before
        each attempt to win a free lease (an instance at its fair share of shards waits)."""
        if ttl < 1 or int(ttl) != ttl:
            raise ValueError("the lease TTL must be a whole number of seconds, at least 1")
        self._nc = nc
        self._js = nc.jetstream()
        self.bucket = bucket
        self.instance_id = instance_id
        self.ttl = ttl
        self.margin = margin if margin is not None else max(0.25, ttl / 4)
        self.replicas = replicas
        self._on_won = on_won
        self._on_lost = on_lost
        self._clock = clock
        self._token = secrets.token_hex(8)  # tells two processes with one instance id apart
        self.key = key
        self._eligible = eligible
        self._subject = f"$KV.{bucket}.{key}"
        self._holding = False
        self._revision = 0
        self._deadline = 0.0
        self.epoch = 0
        self.since: str | None = None
        self.leader: LeaderInfo | None = None
        self._changed = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._feed: KVFeed | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self.transitions = 0
        self.refresh_failures = 0
        self.won_at: datetime | None = None  # wall clock, for "caught up" accounting
        self._expired = False  # the lease key's last entry was an expiry marker

    # --- public ------------------------------------------------------------------------------

    def is_leader_now(self) -> bool:
        """The fence: true only if this instance provably holds the lease at this moment."""
        return self._holding and self._nc.is_connected and self._clock() < self._deadline

    @property
    def running(self) -> bool:
        """True while the campaign and watch tasks run."""
        return bool(self._tasks) and all(not task.done() for task in self._tasks)

    def lease_remaining(self) -> float:
        return max(0.0, self._deadline - self._clock()) if self._holding else 0.0

    async def ensure_bucket(self) -> None:
        """Create the leader bucket if missing (limit markers: an expired lease reaches the
        watchers as a marker, so they campaign at once)."""
        try:
            await self._js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            await self._js.create_key_value(
                KeyValueConfig(
                    bucket=self.bucket,
                    history=1,
                    replicas=self.replicas,
                    direct=True,
                    limit_marker_ttl=max(1.0, self.ttl),
                )
            )

    async def start(self) -> None:
        await self.ensure_bucket()
        self._feed = KVFeed(self._nc, self.bucket, self.key)
        await self._feed.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch(self._feed), name="election-watch"),
            loop.create_task(self._run(), name="election-run"),
        ]

    async def stop(self, release: bool = True) -> None:
        """Stop campaigning; with `release`, hand the lease over at once."""
        self._stopping = True
        self._changed.set()
        await cancel_and_wait(self._tasks)  # a plain cancel can be lost (see _tasks)
        self._tasks = []
        if self._feed is not None:
            await self._feed.stop()
            self._feed = None
        if self._holding and release and self._nc.is_connected:
            self._lose("released")
            await self._delete_if_ours()
        elif self._holding:
            self._lose("stopped")

    async def _delete_if_ours(self) -> bool:
        try:
            # A refresh in flight may have landed: delete at the key's current revision, if
            # the lease is still ours.
            revision, holder = await self._current()
            # Not a lease this election holds again (won back meanwhile): deleting that
            # one would leave it leading on a key another instance can then win.
            if holder is not None and holder.get("token") == self._token and not self._holding:
                headers = {KV_OP: KV_DEL, EXPECTED_LAST: str(revision)}
                await self._js.publish(self._subject, b"", headers=headers, timeout=2)
                logger.bind(instance_id=self.instance_id, key=self.key).info("released the lease")
                return True
        except (nats.errors.Error, TimeoutError) as exc:
            logger.warning("could not release the lease: {}", str(exc) or type(exc).__name__)
        return False

    def connection_lost(self) -> None:
        """Call from the connection's disconnected callback: pause at once."""
        if self._holding:
            self._lose("connection lost")
        self._changed.set()

    def connection_restored(self) -> None:
        self._changed.set()

    def step_down(self, reason: str) -> None:
        """Stop leading now (the leader found it cannot go on); the campaign goes on."""
        if self._holding:
            self._lose(reason)
        self._changed.set()

    async def release(self) -> bool:
        """Hand the lease over at once (a clean handover: call it after the holder stored its
        progress); the campaign goes on, as `eligible()` allows. True if it was released."""
        if not self._holding or not self._nc.is_connected:
            return False
        self._lose("released")
        return await self._delete_if_ours()

    def nudge(self) -> None:
        """Look at the lease again now (eligibility may have changed)."""
        self._changed.set()

    # --- internals ------------------------------------------------------------------------------

    async def _watch(self, feed: KVFeed) -> None:
        async for entry in feed:
            if entry is None:
                continue
            deleted = entry.operation in ("DEL", "PURGE")
            self._note_leader(entry.revision or 0, None if deleted else _decode(entry.value))
            self._changed.set()

    def _note_leader(self, revision: int, holder: dict[str, Any] | None) -> None:
        """What the watch or a read of the key says about the current leader."""
        if holder is None:
            self.leader = None
        elif holder.get("token") != self._token or not self._holding:
            # Our own refreshes keep `leader` as set when we won (same epoch and since).
            self.leader = LeaderInfo(
                instance_id=str(holder.get("instance_id")),
                since=str(holder.get("since")),
                epoch=int(holder.get("epoch") or revision),
            )

    async def _run(self) -> None:
        while not self._stopping:
            # Clear before acting, not before waiting: a change seen while campaigning
            # (a release landing mid-read) must still wake the next wait at once.
            self._changed.clear()
            try:
                if self._holding:
                    await self._refresh()
                    # Not woken by changes: the watch also echoes our own refreshes.
                    await asyncio.sleep(self.ttl / 3)
                else:
                    await self._campaign()
                    if not self._holding:
                        # A change of the key (or its expiry marker) wakes us; the timeout
                        # is only a safety net for a missed watch event.
                        await self._wait(self.ttl)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let the election die silently
                logger.exception("election loop error: {}", exc)
                await self._wait(min(1.0, self.ttl / 3))

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    def _value(self, epoch: int | None) -> bytes:
        return json.dumps(
            {
                "instance_id": self.instance_id,
                "token": self._token,
                "since": self.since or _now(),
                "epoch": epoch,
            }
        ).encode()

    async def _put(self, value: bytes, last: int, timeout: float) -> int:
        headers = {EXPECTED_LAST: str(last)}
        ack = await self._js.publish(
            self._subject, value, headers=headers, msg_ttl=self.ttl, timeout=timeout
        )
        return int(ack.seq)

    async def _campaign(self) -> None:
        if not self._nc.is_connected:
            return
        try:
            last, holder = await self._current()
        except (nats.errors.Error, TimeoutError) as exc:
            logger.debug("reading the lease failed: {}", exc)
            return
        # A fresh read: `status` stays right even while the watch is behind.
        self._note_leader(last, holder)
        if holder is not None and holder.get("token") != self._token:
            return  # someone else holds it
        if not self._expired and not self._eligible():
            # Released cleanly to another instance that has less than its share. (An
            # expired lease, its holder dead or cut off, is taken by whoever is first: its
            # shard must not wait until the others see that instance gone.) Our own token
            # still on the key is no claim either: a release whose delete has not landed
            # yet, which we must not take back.
            return
        sent = self._clock()
        self.since = _now()
        try:
            revision = await self._put(self._value(None), last, timeout=self.ttl / 3)
        except nats.js.errors.APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                return  # lost the race
            raise
        except (nats.errors.Error, TimeoutError) as exc:
            logger.debug("campaign write failed: {}", exc)
            return
        self._won(revision, sent)

    async def _current(self) -> tuple[int, dict[str, Any] | None]:
        """(revision to expect, holder) of the lease key; holder None when free."""
        try:
            msg = await self._js.get_msg(f"KV_{self.bucket}", subject=self._subject, direct=True)
        except nats.js.errors.NotFoundError:
            return 0, None
        headers = msg.headers or {}
        revision = int(msg.seq or 0)
        self._expired = KV_MARKER_REASON in headers
        if is_kv_delete(headers):
            return revision, None
        return revision, _decode(msg.data)

    async def _refresh(self) -> None:
        sent = self._clock()
        timeout = max(0.05, min(self.ttl / 3, self._deadline - sent))
        try:
            revision = await self._put(self._value(self.epoch), self._revision, timeout)
        except nats.js.errors.APIError as exc:
            self.refresh_failures += 1
            if exc.err_code in WRONG_LAST_SEQUENCE:
                self._lose("lease taken over or expired")
                return
            logger.warning("lease refresh failed: {}", exc)
        except (nats.errors.Error, TimeoutError) as exc:
            self.refresh_failures += 1
            logger.warning("lease refresh failed: {}", exc)
        else:
            self._revision = revision
            self._set_deadline(sent + self.ttl - self.margin)
            return
        if self._clock() >= self._deadline:
            self._lose("lease refresh failed past its deadline")

    def _set_deadline(self, deadline: float) -> None:
        self._deadline = deadline
        if self._expiry is not None:
            self._expiry.cancel()
        delay = max(0.0, deadline - self._clock())
        self._expiry = asyncio.get_running_loop().call_later(delay, self._check_deadline)

    def _check_deadline(self) -> None:
        if self._holding and self._clock() >= self._deadline:
            self._lose("lease deadline passed without a refresh")
            self._changed.set()

    def _won(self, revision: int, sent: float) -> None:
        self._revision = revision
        self.epoch = revision
        self._holding = True
        self.won_at = datetime.now(UTC)
        self._set_deadline(sent + self.ttl - self.margin)
        self.leader = LeaderInfo(self.instance_id, self.since or _now(), revision)
        self.transitions += 1
        logger.bind(instance_id=self.instance_id, epoch=revision, key=self.key).info(
            "won the lease"
        )
        if self._on_won is not None:
            self._on_won(revision)

    def _lose(self, reason: str) -> None:
        if not self._holding:
            return
        self._holding = False
        self._deadline = 0.0
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.transitions += 1
        level = "INFO" if reason == "released" else "WARNING"
        logger.bind(instance_id=self.instance_id, epoch=self.epoch, key=self.key).log(
            level, "lost the lease: {}", reason
        )
        if self._on_lost is not None:
            self._on_lost(reason)


def _decode(value: bytes | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        data = json.loads(value)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
