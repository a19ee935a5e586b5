"""`WriteBack`: the job store's queue of KV writes and the task that drains it.

Changes are queued per key from any thread (`put`, `delete`), coalesced (only a key's
latest change is written) and sent in pipelined batches by one task on the loop, each a
compare-and-set on the revision the owner knows (`revision_of`). The owner hears of every
outcome through callbacks: `written(key, revision)`, or `conflict(key)` when another
writer won (the owner reloads the key, and `drop()`s what it had queued). A write that
failed for want of NATS is retried with a backoff. `flush()` waits for every change made
before the call, even while new ones keep coming; `persist(key)` waits for one key and
raises `WriteConflict` if its write lost.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
from loguru import logger

from nats_apscheduler._gate import LevelGate
from nats_apscheduler._kvwrite import KVWrites, Outcome
from nats_apscheduler._tasks import cancel_and_wait
from nats_apscheduler.errors import StoreError, WriteConflict

RETRY_MIN, RETRY_MAX = 0.05, 2.0  # seconds between retries while NATS is away
Data = bytes | None  # a record, or None to delete the key


class WriteBack:
    def __init__(
        self,
        writes: KVWrites,
        revision_of: Callable[[str], int],
        written: Callable[[str, int], None],
        conflict: Callable[[str], Awaitable[None]],
        create: Callable[[str, bytes], Awaitable[int]] | None = None,
        soon: Callable[..., None] | None = None,
    ) -> None:
        """`create(key, data)` re-creates a key over its deletion marker (a KV create must
        name the marker's revision); `soon(fn)` runs `fn` on the loop from any thread."""
        self._writes = writes
        self._revision_of = revision_of
        self._written = written
        self._conflict = conflict
        self._create = create
        self._soon = soon
        self._lock = threading.Lock()
        self._queue: dict[str, Data] = {}
        self._flying: dict[str, Data] = {}
        # Tickets: each change gets the next number; a key remembers its oldest change not
        # yet written. Flushers wait for the level "every change up to n is written".
        self._tick = 0
        self._since: dict[str, int] = {}  # queued keys -> oldest ticket
        self._flying_since: dict[str, int] = {}
        self._flushed = LevelGate()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._wake: asyncio.Event | None = None
        self._kicked = False
        self._task: asyncio.Task[None] | None = None

    # --- any thread ---------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        self._enqueue(key, data)

    def delete(self, key: str) -> None:
        self._enqueue(key, None)

    def pending(self, key: str) -> Data | None:
        """The last change of `key` not yet acknowledged (queued or in flight), or None."""
        with self._lock:
            if key in self._queue:
                return self._queue[key]
            return self._flying.get(key)

    def busy(self, key: str) -> bool:
        with self._lock:
            return key in self._queue or key in self._flying

    def is_deleting(self, key: str) -> bool:
        with self._lock:
            return key in self._flying and self._flying[key] is None

    def drop(self, key: str) -> None:
        """Discard the queued change of `key` (a newer remote version overtook it)."""
        with self._lock:
            if key not in self._queue:
                return
            del self._queue[key]
            self._since.pop(key, None)
            waiters = [] if key in self._flying else self._waiters.pop(key, [])
        self._kick()  # flushers may be done now
        error = WriteConflict(f"job {key!r} was changed by another writer")
        for future in waiters:
            self._resolve(future, error)

    def _enqueue(self, key: str, data: Data) -> None:
        with self._lock:
            self._tick += 1
            self._queue[key] = data
            self._since.setdefault(key, self._tick)
        self._kick()

    def _kick(self) -> None:
        if self._wake is None or self._kicked:
            return
        self._kicked = True
        if self._soon is not None:
            self._soon(self._wake.set)
        else:
            self._wake.set()

    def _resolve(self, future: asyncio.Future[None], error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        if self._soon is not None:
            self._soon(settle)
        else:
            settle()

    # --- the loop -----------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._wake = asyncio.Event()
        self._kicked = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="jobstore-writer")
        if self._queue:
            self._kick()
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])  # a plain cancel can be lost (see _tasks)
            self._task = None
        error = StoreError("the job store closed before the change was written")
        self._flushed.fail_all(error)
        with self._lock:
            waiters = [f for futures in self._waiters.values() for f in futures]
            self._waiters.clear()
        for future in waiters:
            if not future.done():
                future.set_exception(error)

    async def flush(self) -> None:
        """Wait until every change made before the call is written (or lost its race)."""
        with self._lock:
            target = self._tick
        self._kick()
        await self._flushed.wait(target)

    async def persist(self, key: str) -> None:
        """Wait for the queued change of `key`; WriteConflict if another writer won."""
        with self._lock:
            if key not in self._queue and key not in self._flying:
                return
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, []).append(future)
        await future

    def unwritten(self) -> int:
        with self._lock:
            return len(set(self._queue) | set(self._flying))

    async def _run(self) -> None:
        assert self._wake is not None
        backoff = RETRY_MIN
        while True:
            await self._wake.wait()
            self._wake.clear()
            with self._lock:
                self._kicked = False
                batch = {k: v for k, v in self._queue.items() if k not in self._flying}
                for key in batch:
                    del self._queue[key]
                    self._flying_since[key] = self._since.pop(key)
                self._flying.update(batch)
            if batch:
                if await self._send(batch):
                    backoff = RETRY_MIN
                else:  # NATS unreachable: retry the failed keys, backing off
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_MAX)
            with self._lock:
                if self._queue:
                    self._wake.set()
                oldest = min(
                    min(self._since.values(), default=math.inf),
                    min(self._flying_since.values(), default=math.inf),
                )
                level = self._tick if oldest == math.inf else int(oldest) - 1
            self._flushed.raise_to(level)

    async def _send(self, batch: dict[str, Data]) -> bool:
        """Compare-and-set writes of a batch, pipelined; False if some must be retried."""
        writes = [
            (key, data, self._revision_of(key))
            for key, data in batch.items()
            if data is not None or self._revision_of(key)  # never-stored key: nothing to delete
        ]
        outcomes: dict[str, Outcome | None] = dict.fromkeys(batch)
        results = await self._writes.send(writes)
        for (key, data, last), result in zip(writes, results, strict=True):
            outcome: Outcome | None = result
            if (
                last == 0
                and isinstance(outcome, nats.js.errors.KeyWrongLastSequenceError)
                and self._create is not None
                and data is not None
            ):
                # A create over a deleted key must name the deletion's revision.
                try:
                    outcome = await self._create(key, data)
                except (nats.errors.Error, TimeoutError, OSError) as exc:
                    outcome = exc
            outcomes[key] = outcome
        failed = [(key, out) for key, out in outcomes.items() if is_transient(out)]
        first: Outcome | None = failed[0][1] if failed else None
        if failed:
            logger.error(
                "writing {} job(s) failed, retrying: {} (first: {!r})",
                len(failed),
                str(first) or type(first).__name__,
                failed[0][0],
            )
        for key, outcome in outcomes.items():
            await self._settle(key, batch[key], outcome)
        return not failed

    async def _settle(self, key: str, data: Data, outcome: Outcome | None) -> None:
        """Record one write's outcome (None: nothing was written) and answer its waiters."""
        error: BaseException | None = None
        if isinstance(outcome, int):
            self._written(key, outcome)
        elif is_transient(outcome):
            error = StoreError(f"writing job {key!r} failed: {outcome}")
        elif outcome is not None:
            error = WriteConflict(f"job {key!r} was changed by another writer")
            logger.bind(job_id=key).info(
                "write lost a compare-and-set race; reloading ({!r})", outcome
            )
            # The owner reloads the key (dropping newer local changes) while the write still
            # counts as in flight: whoever waits for it meanwhile hears of the conflict, and
            # a retry starts from the other writer's version.
            await self._conflict(key)
        with self._lock:
            self._flying.pop(key, None)
            ticket = self._flying_since.pop(key)
            if is_transient(outcome):
                # Retried later (or superseded by a newer queued change, which then carries
                # this change's ticket: a flusher waiting for it waits for that write).
                self._queue.setdefault(key, data)
                self._since[key] = min(ticket, self._since.get(key, ticket))
            if key in self._queue:
                waiters: list[asyncio.Future[None]] = []
            else:
                waiters = self._waiters.pop(key, [])
        for future in waiters:
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)


def is_transient(outcome: Outcome | None) -> bool:
    """A write that failed for want of NATS (retried), not because of what KV holds."""
    if isinstance(outcome, nats.js.errors.ServiceUnavailableError):
        return True
    if isinstance(outcome, nats.js.errors.APIError):
        return False  # a lost compare-and-set race, or a write the stream refuses
    return isinstance(outcome, nats.errors.Error | TimeoutError | OSError)
