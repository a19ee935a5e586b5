"""Shards: which lease covers which jobs, which instances are alive, and each one's fair share.

A deployment spreads its jobs over `K` shards (`NATS_CRON_SHARDS`, default 1). A job's shard
is **CRC-32 (IEEE, the checksum of zlib, Go's `hash/crc32`, Java's `CRC32`) of its subject's
UTF-8 bytes, modulo K**: the same in every language, so tools can compute it. Each shard has
its own lease, epoch, fence and progress mark in the leader bucket: with K = 1 the keys are
today's `leader` and `progress`; with more, `leader.<n>` and `progress.<n>`. The deployment's
K is recorded under `config` by the first instance; one started with another K refuses to
start.

Every instance announces itself with a key `members.<id>` that has a per-key TTL (the lease
TTL) and is refreshed every TTL/3, and watches the others'. With N live instances, no
instance holds more than ceil(K / N) shards: it campaigns for a free shard only below that
share, and above it (a newcomer arrived) releases one shard per balancing round, after
storing that shard's progress (a clean handover: the newcomer wins at once, no slot lost,
none twice). Knows nothing of APScheduler or firing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from loguru import logger
from nats.aio.client import Client
from nats.js.kv import KeyValue

from nats_apscheduler._tasks import cancel_and_wait
from nats_apscheduler._watch import KVFeed
from nats_apscheduler.errors import ConfigError
from nats_apscheduler.protocol import EXPECTED_LAST, WRONG_LAST_SEQUENCE, is_kv_delete

CONFIG_KEY = "config"
MEMBERS = "members"


def shard_of(subject: str, shards: int) -> int:
    """The shard of a job: CRC-32 of its subject's UTF-8 bytes, modulo `shards`."""
    if shards <= 1:
        return 0
    return zlib.crc32(subject.encode()) % shards


def lease_key(shard: int, shards: int) -> str:
    return "leader" if shards <= 1 else f"leader.{shard}"


def progress_key(shard: int, shards: int) -> str:
    return "progress" if shards <= 1 else f"progress.{shard}"


def fair_share(shards: int, members: int) -> int:
    """The most shards one of `members` live instances may hold."""
    return math.ceil(shards / max(1, members))


def preference(token: str, shard: int) -> int:
    """How much an instance wants a shard (rendezvous hashing): it releases its least wanted
    first, so that a set of instances settles on one assignment."""
    return zlib.crc32(f"{token}:{shard}".encode())


async def check_shards(nc: Client, bucket: str, shards: int) -> int:
    """Record the deployment's number of shards, or check it against the recorded one;
    ConfigError if they differ. Returns the recorded number."""
    js = nc.jetstream()
    subject = f"$KV.{bucket}.{CONFIG_KEY}"
    value = json.dumps({"shards": shards}).encode()
    for _ in range(5):
        try:
            msg = await js.get_msg(f"KV_{bucket}", subject=subject, direct=False)
        except nats.js.errors.NotFoundError:
            msg = None
        if msg is not None and not is_kv_delete(msg.headers):
            try:
                recorded = int(json.loads(msg.data or b"{}")["shards"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    "NATS_CRON_SHARDS", f"the recorded configuration in {bucket!r} is unreadable"
                ) from exc
            if recorded != shards:
                raise ConfigError(
                    "NATS_CRON_SHARDS",
                    f"this instance has {shards} but the deployment has {recorded} (recorded "
                    f"in bucket {bucket!r}, key {CONFIG_KEY!r}); the number of shards is "
                    "fixed per deployment",
                )
            return recorded
        last = int(msg.seq or 0) if msg is not None else 0
        try:
            await js.publish(subject, value, headers={EXPECTED_LAST: str(last)}, timeout=2)
            return shards
        except nats.js.errors.APIError as exc:
            if exc.err_code not in WRONG_LAST_SEQUENCE:
                raise
            # Another instance recorded it first: read theirs.
    raise ConfigError("NATS_CRON_SHARDS", f"could not record the number of shards in {bucket!r}")


class Members:
    """This instance's presence key and the set of live instances."""

    def __init__(
        self,
        nc: Client,
        bucket: str,
        instance_id: str,
        ttl: float,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.bucket = bucket
        self.instance_id = instance_id
        self.token = secrets.token_hex(6)
        self.ttl = ttl
        self._on_change = on_change
        self._subject = f"$KV.{bucket}.{MEMBERS}.{self.token}"
        self.live: dict[str, dict[str, Any]] = {}  # token -> {"instance_id", "since"}
        self._feed: KVFeed | None = None
        self._task: asyncio.Task[None] | None = None
        self._since = datetime.now(UTC).isoformat(timespec="milliseconds")

    def count(self) -> int:
        return max(1, len(self.live | {self.token: {}}))

    async def start(self) -> None:
        """Announce this instance, then load who else is alive (returns once loaded)."""
        await self._announce()
        loaded = asyncio.get_running_loop().create_future()

        def handle(entry: KeyValue.Entry | None) -> None:
            if entry is None:
                if not loaded.done():
                    loaded.set_result(None)
                return
            token = entry.key[len(MEMBERS) + 1 :]
            gone = entry.operation in ("DEL", "PURGE") or not entry.value
            before = len(self.live)
            if gone:
                self.live.pop(token, None)
            else:
                try:
                    self.live[token] = json.loads(entry.value or b"{}")
                except ValueError:
                    return
            if len(self.live) != before:
                self._on_change()

        self._feed = KVFeed(self._nc, self.bucket, f"{MEMBERS}.>", handler=handle)
        await self._feed.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(loaded, 5)
        self._task = asyncio.get_running_loop().create_task(self._refresh(), name="members")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        if self._feed is not None:
            await self._feed.stop()
        if self._nc.is_connected:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self._js.publish(self._subject, b"", headers={"KV-Operation": "DEL"})

    async def _announce(self) -> None:
        value = json.dumps({"instance_id": self.instance_id, "since": self._since}).encode()
        await self._js.publish(self._subject, value, msg_ttl=self.ttl, timeout=self.ttl / 3)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self._announce()
            except (nats.errors.Error, TimeoutError) as exc:
                logger.debug("refreshing this instance's presence failed: {}", exc)
