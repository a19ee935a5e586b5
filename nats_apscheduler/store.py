"""`JetStreamJobStore`: an APScheduler 3 job store persisting jobs in a JetStream KV bucket.

Threading model
---------------
All NATS I/O runs on one asyncio loop: the loop of a connection the application passes
in (`nc=`), or a private loop on a daemon thread when the store connects by itself.
APScheduler calls the store synchronously, from its own thread (Background/Blocking
schedulers) or from that same loop (AsyncIOScheduler). So:

- Reads (`lookup_job`, `get_due_jobs`, `get_next_run_time`, `get_all_jobs`) never touch
  the network: they read an in-memory index (an APScheduler `MemoryJobStore`, the
  reference behaviour) kept current by a KV watch. A change written by another process
  replaces the local copy and wakes the scheduler.
- Writes (`add_job`, `update_job`, `remove_job`) check and update the index at once,
  raising APScheduler's `ConflictingIdError` / `JobLookupError` as its contract says,
  then queue the KV write. A single writer task on the loop drains the queue, coalescing
  repeated writes to one key and pipelining different keys (`KVWrites`: one publish per
  write, all acks on one subscription), each write a compare-and-set on the record's last
  known revision. The fire path (`update_job` under the scheduler's lock) therefore never
  waits for a round trip. `flush()` / `await aflush()` wait until every change made before
  the call is in KV (not for an idle moment: a busy store is never idle);
  `await apersist(job_id)` waits for one job and raises if its write lost a
  compare-and-set race (the other writer's version is then the local one).
- Only `start()` (initial load) and `flush()` block. On the loop's own thread they
  would deadlock, so they raise `BridgeError` there: with a shared loop, `await
  store.open()` before `scheduler.start()` and `await store.aclose()` after shutdown.

Records are versioned JSON (see `codec`), never pickle. A record's function reference is
resolved only through the allow-list; an unreadable record or one naming a function off
the list is logged and skipped: it stays in KV, is never executed and never deleted
unless someone removes that job id explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import re
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import nats
import nats.errors
import nats.js.errors
from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.util import datetime_to_utc_timestamp, obj_to_ref, ref_to_obj
from loguru import logger
from nats.aio.client import Client
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from nats_apscheduler._bridge import LoopBridge
from nats_apscheduler._kvwrite import KVWrites, Outcome
from nats_apscheduler._watch import KVFeed
from nats_apscheduler.codec import RecordEncoder, build_job, decode_record
from nats_apscheduler.errors import RecordError, StoreError, WriteConflict

DEFAULT_BUCKET = "nats-cron-jobs"
FIRE_REF = "nats_apscheduler.fire:fire"
_DELETE = None  # a queued op of None means "delete the key"
_MISSING = object()
# Valid KV keys (nats-py's own rule): no leading or trailing dot.
_KEY = re.compile(r"^[-/_=\.a-zA-Z0-9]+$")
_KV_OP = "KV-Operation"
_RETRY_MIN, _RETRY_MAX = 0.05, 2.0  # seconds between write retries while NATS is away


class _Resolver:
    """Maps textual function references to callables, only for references on the list."""

    def __init__(self, functions: Mapping[str, Callable[..., Any]] | Iterable[Any] | None):
        self._bound: dict[str, Callable[..., Any] | None] = {}
        if functions is None:
            functions = (FIRE_REF,)
        if isinstance(functions, Mapping):
            self._bound.update(functions)
        else:
            for item in functions:
                if isinstance(item, str):
                    self._bound[item] = None  # imported on first use
                else:
                    self._bound[obj_to_ref(item)] = item

    def allowed(self, ref: str) -> bool:
        return ref in self._bound

    def resolve(self, ref: str) -> Callable[..., Any]:
        if ref not in self._bound:
            raise RecordError(f"function {ref!r} is not on the store's allow-list")
        func = self._bound[ref]
        if func is None:
            try:
                func = self._bound[ref] = ref_to_obj(ref)
            except (LookupError, ImportError, ValueError) as exc:
                raise RecordError(f"function {ref!r} cannot be imported ({exc})") from exc
        return func


class JetStreamJobStore(BaseJobStore):  # type: ignore[misc]
    """APScheduler job store on a JetStream KV bucket (plugin alias ``jetstream``).

    :param bucket: KV bucket name (created if missing)
    :param replicas: bucket replicas when the store creates it
    :param nc: an existing nats-py connection; its event loop runs the store's I/O
    :param url: server URL(s) for a connection of the store's own (when `nc` is None)
    :param connect_options: extra `nats.connect` keyword arguments (credentials, TLS...)
    :param functions: allow-list of function references (strings or callables), or a
        mapping of reference to callable (binds a reference to, e.g., a bound method);
        default: only ``nats_apscheduler.fire:fire``
    :param timeout: seconds a blocking call (start, flush) waits
    """

    def __init__(
        self,
        bucket: str = DEFAULT_BUCKET,
        replicas: int = 1,
        nc: Client | None = None,
        url: str | list[str] = "nats://localhost:4222",
        connect_options: dict[str, Any] | None = None,
        functions: Mapping[str, Callable[..., Any]] | Iterable[Any] | None = None,
        timeout: float = 10.0,
    ) -> None:
        super().__init__()
        self.bucket = bucket
        self.replicas = replicas
        self.writer_id = uuid.uuid4().hex
        self._nc = nc
        self._own_nc = nc is None
        self._url = url
        self._connect_options = dict(connect_options or {})
        self._resolver = _Resolver(functions)
        self._timeout = timeout
        self._bridge: LoopBridge | None = None
        self._kv: KeyValue | None = None
        self._lock = threading.RLock()
        self._index = MemoryJobStore()
        self._encoder = RecordEncoder()
        self._revisions: dict[str, int] = {}
        self._skipped: dict[str, str] = {}  # job id -> why its record is not loaded
        # Job objects replaced by a remote change (all of them, not only the latest per id:
        # an executor may still hold one from two versions ago and write it back).
        # Keyed by id(): Job defines __eq__ without __hash__; a dead object drops out, so an
        # id() is never reused while its entry exists.
        self._stale: weakref.WeakValueDictionary[int, Job] = weakref.WeakValueDictionary()
        self._queue: dict[str, bytes | None] = {}  # job id -> record to write (None: delete)
        self._deferred: dict[str, Job] = {}  # held jobs whose record is encoded at release
        self._held: dict[str, int] = {}  # job id -> holds: its writes wait (see hold())
        self._inflight: dict[str, bytes | None] = {}  # job id -> the write in flight
        self._kick_pending = False
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Flushing: the ticket of each outstanding key's oldest unwritten change, and each
        # flusher's ticket (the last one given out when it called). A flusher is done once
        # no outstanding key is as old, even if newer changes keep coming (a busy store
        # firing thousands of jobs a second is never idle).
        self._tick = 0
        self._since: dict[str, int] = {}  # queued or deferred changes
        self._flying: dict[str, int] = {}  # changes in flight
        self._flushers: list[tuple[int, asyncio.Future[None]]] = []
        self._writes: KVWrites | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._loaded: asyncio.Event | None = None
        self._opened = False
        self._closing = False
        self._applied = 0  # watched entries handled (load progress)
        self._applied_seq = 0  # stream sequence of the last watched entry handled
        self._bulk: dict[str, Job] | None = None
        self._feed: KVFeed | None = None
        self._sync_waiters: list[tuple[int, asyncio.Future[None]]] = []
        #: Called (on the loop) if the watch or writer task dies; the service exits on it.
        self.on_failure: Callable[[BaseException], None] | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (if needed), create/bind the bucket and load every job. Idempotent."""
        if self._opened:
            return
        self._closing = False
        loop = asyncio.get_running_loop()
        if self._bridge is None:
            self._bridge = LoopBridge(loop)
        if self._nc is None:
            self._nc = await nats.connect(self._url, **self._connect_options)
        js = self._nc.jetstream()
        try:
            self._kv = await js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            config = KeyValueConfig(bucket=self.bucket, replicas=self.replicas, direct=True)
            self._kv = await js.create_key_value(config)
        with self._lock:  # a reopened store reloads everything from the watch
            self.writer_id = uuid.uuid4().hex  # ...including what it wrote itself before
            self._index = MemoryJobStore()
            self._revisions.clear()
            self._skipped.clear()
            self._stale.clear()
        self._applied_seq = 0
        self._bulk = {}  # jobs of the initial load, indexed at once when it ends
        self._writes = KVWrites(self._nc, self.bucket)
        await self._writes.start()
        self._wake = asyncio.Event()
        self._loaded = asyncio.Event()
        self._tasks = [
            loop.create_task(self._watch(), name=f"jobstore-watch-{self.bucket}"),
            loop.create_task(self._writer(), name=f"jobstore-writer-{self.bucket}"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        watch = self._tasks[0]
        loaded = loop.create_task(self._loaded.wait())
        seen = -1
        # The load allocates millions of objects that all stay alive: Python's cyclic GC
        # would run ~1,400 collections over the growing heap for 100,000 jobs, a third of
        # the load time (bench/profiling.py startup). Reference counting still frees.
        # Afterwards gc.freeze() keeps the loaded objects out of later collections (the
        # first full one would otherwise stall the loop ~0.5 s right when firing starts).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            # A large bucket takes a while: give up only when the load stops making progress.
            while not loaded.done() and not watch.done() and self._applied != seen:
                seen = self._applied
                await asyncio.wait(
                    [loaded, watch], timeout=self._timeout, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            if gc_was_enabled:
                gc.freeze()
                gc.enable()
        if not loaded.done():
            loaded.cancel()
            failure = watch.exception() if watch.done() and not watch.cancelled() else None
            await self.aclose()
            if failure is not None:
                raise StoreError(f"watching bucket {self.bucket!r} failed: {failure}") from failure
            raise StoreError(f"loading bucket {self.bucket!r} stalled for {self._timeout}s")
        self._opened = True
        logger.bind(bucket=self.bucket).debug(
            "job store loaded {} jobs", len(self._index.get_all_jobs())
        )

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._closing or task.cancelled():
            return
        exc = task.exception() or StoreError(f"{task.get_name()} ended unexpectedly")
        logger.bind(bucket=self.bucket).opt(exception=exc).error("job store task died: {}", exc)
        if self.on_failure is not None:
            self.on_failure(exc)

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        if not self._opened:
            if self._bridge is None and self._own_nc:
                self._bridge = LoopBridge.on_new_thread(f"jobstore-{self.bucket}")
            if self._bridge is None:
                raise StoreError("await store.open() on the connection's loop before starting")
            self._bridge.call(self.open(), self._timeout + 5, "JetStreamJobStore.start()")
        with self._lock:
            for job in self._index.get_all_jobs():
                self._attach(job)

    def shutdown(self) -> None:
        """Stop watching and flush queued writes. Never deletes jobs (unlike MemoryJobStore)."""
        if self._bridge is None:
            return
        if self._bridge.in_loop_thread():
            # Cannot wait here; the application awaits aclose() to flush.
            task = self._bridge.loop.create_task(self.aclose())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        try:
            self._bridge.call(self.aclose(), self._timeout + 5, "JetStreamJobStore.shutdown()")
        finally:
            if self._bridge.owns_loop:
                self._bridge.stop()
                self._bridge = None  # a later start() runs a new loop
            if self._own_nc:
                self._nc = None  # ... and a new connection

    async def aclose(self) -> None:
        """Flush queued writes (bounded by the timeout), stop the tasks, close our connection."""
        self._closing = True
        if self._tasks and not self._tasks[1].done():
            try:
                await asyncio.wait_for(self.aflush(), self._timeout)
            except TimeoutError:
                pending = len(set(self._queue) | set(self._inflight))
                logger.warning("job store closed with {} unwritten changes", pending)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._writes is not None:
            await self._writes.stop()
            self._writes = None
        self._opened = False
        if self._own_nc and self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    # --- reads: memory only ---------------------------------------------------------------

    def lookup_job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._index.lookup_job(job_id)

    def get_due_jobs(self, now: Any) -> list[Job]:
        with self._lock:
            return self._index.get_due_jobs(now)  # type: ignore[no-any-return]

    def get_next_run_time(self) -> Any:
        with self._lock:
            return self._index.get_next_run_time()

    def get_all_jobs(self) -> list[Job]:
        with self._lock:
            jobs: list[Job] = self._index.get_all_jobs()
        self._fix_paused_jobs_sorting(jobs)
        return jobs

    @property
    def loaded(self) -> bool:
        """True once the initial load is done and the watch and writer run."""
        return self._opened and all(not task.done() for task in self._tasks)

    def revision(self, job_id: str) -> int:
        """The KV revision of `job_id`'s last stored change this store knows of (0: none;
        a write still queued is not counted until it lands)."""
        with self._lock:
            return self._revisions.get(job_id, 0)

    def skipped_records(self) -> dict[str, str]:
        """Job ids whose KV records were not loaded, with the reason."""
        with self._lock:
            return dict(self._skipped)

    # --- writes: index now, KV through the writer --------------------------------------------

    def add_job(self, job: Job) -> None:
        if (
            not isinstance(job.id, str)
            or not _KEY.match(job.id)
            or job.id[0] == "."
            or job.id[-1] == "."
        ):
            raise ValueError(
                f"job id {job.id!r} is not a valid KV key (letters, digits and - / _ = . only, "
                "no leading or trailing dot)"
            )
        if not self._resolver.allowed(job.func_ref or ""):
            raise ValueError(f"function {job.func_ref!r} is not on the store's allow-list")
        data = self._encoder.encode(job, self.writer_id)
        with self._lock:
            if job.id in self._skipped:
                raise ConflictingIdError(job.id)
            self._index.add_job(job)
            self._stale.pop(id(job), None)  # re-added after a removal: current again
            job.func = self._resolver.resolve(job.func_ref)
            self._enqueue(job.id, data)

    def update_job(self, job: Job) -> None:
        if self._is_stale(job):
            return  # a copy a remote change replaced: that change wins (checked again below)
        with self._lock:
            if job.id in self._held and self._index.lookup_job(job.id) is job:
                # Encoded once at release(): a fire updates its job twice (APScheduler's
                # next run time, then our run state) and only the last version is written.
                self._reindex(job)
                self._deferred[job.id] = job
                self._outstanding(job.id)
                return
        try:
            data = self._encoder.encode(job, self.writer_id)
        except ValueError:
            # APScheduler already changed this Job object in place: take it out of the
            # index so it can never run in that state, and reload the stored version.
            with self._lock:
                if self._index.lookup_job(job.id) is job:
                    self._index.remove_job(job.id)
                    self._stale[id(job)] = job
                # The last accepted version: still queued, in flight, or else in KV.
                last = self._queue.get(job.id, self._inflight.get(job.id))
                if last is not None:
                    self._apply(job.id, last)
                    raise
            if self._bridge is not None and not self._bridge.in_loop_thread():
                with contextlib.suppress(TimeoutError, StoreError):
                    self._bridge.call(self._resync(job.id), self._timeout, "reloading a job")
            elif self._bridge is not None:
                self._spawn_resync(job.id)  # cannot wait on the loop's own thread
            raise
        with self._lock:
            if self._is_stale(job):
                # The scheduler still held the copy a remote change replaced: that change wins.
                return
            self._reindex(job)
            self._enqueue(job.id, data)

    def remove_job(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._skipped:
                del self._skipped[job_id]
            else:
                self._index.remove_job(job_id)
            self._deferred.pop(job_id, None)
            self._encoder.forget(job_id)
            self._enqueue(job_id, _DELETE)

    def remove_all_jobs(self) -> None:
        with self._lock:
            ids = [job.id for job in self._index.get_all_jobs()] + list(self._skipped)
            self._index.remove_all_jobs()
            self._skipped.clear()
            self._stale.clear()
            self._deferred.clear()
            self._encoder.clear()
            for job_id in ids:
                self._enqueue(job_id, _DELETE)

    def hold(self, job_id: str) -> None:
        """Keep `job_id`'s writes queued until `release()`.

        An executor holds a job while its fire is in flight, so that the job's advanced
        next run time never reaches KV before the fire itself went out: a crash in between
        leaves the slot for the next leader instead of losing it. While a job is held,
        `update_job` of its indexed object only updates the index; its record is encoded
        once, at the last `release()` (a fire updates a job twice). An update that cannot
        be encoded is then logged and dropped, and the stored version reloaded.
        """
        with self._lock:
            self._held[job_id] = self._held.get(job_id, 0) + 1

    def release(self, job_id: str) -> None:
        with self._lock:
            holds = self._held.get(job_id, 0) - 1
            if holds > 0:
                self._held[job_id] = holds
                return
            self._held.pop(job_id, None)
            job = self._deferred.pop(job_id, None)
            if job is not None:
                try:
                    self._queue[job_id] = self._encoder.encode(job, self.writer_id)
                except ValueError as exc:
                    # Only an application's own held job can get here (nats-cron's state
                    # is JSON): keep the last stored version, as a rejected update does.
                    logger.bind(job_id=job_id).error("cannot store job: {}", exc)
                    if self._bridge is not None:
                        self._bridge.soon(self._spawn_resync, job_id)
                    self._since.pop(job_id, None)
                    if self._flushers:
                        self._kick()
            if job_id in self._queue:
                self._kick()

    def _enqueue(self, job_id: str, data: bytes | None) -> None:
        self._queue[job_id] = data
        self._outstanding(job_id)
        if job_id not in self._held:
            self._kick()

    def _outstanding(self, job_id: str) -> None:
        self._tick += 1
        self._since.setdefault(job_id, self._tick)

    def _kick(self) -> None:
        if not self._kick_pending and self._bridge is not None and self._wake is not None:
            self._kick_pending = True
            self._bridge.soon(self._wake.set)

    # --- durability --------------------------------------------------------------------------

    def flush(self) -> None:
        """Block until every queued write is in KV (not on the store's loop thread)."""
        if self._bridge is not None:
            self._bridge.call(self.aflush(), self._timeout, "JetStreamJobStore.flush()")

    async def aflush(self) -> None:
        """Wait until every change made so far has been written (or lost its race)."""
        with self._lock:
            if not self._since and not self._flying:
                return
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._flushers.append((self._tick, future))
        self._kick()
        await future

    async def apersist(self, job_id: str) -> None:
        """Wait for the queued write of `job_id`; WriteConflict if another writer won."""
        with self._lock:
            if (
                job_id not in self._queue
                and job_id not in self._inflight
                and job_id not in self._deferred
            ):
                return
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(job_id, []).append(future)
        await future

    # --- the writer task -------------------------------------------------------------------

    async def _writer(self) -> None:
        assert self._wake is not None
        backoff = _RETRY_MIN
        while True:
            await self._wake.wait()
            self._wake.clear()
            with self._lock:
                self._kick_pending = False
                batch = {k: v for k, v in self._queue.items() if k not in self._held}
                for job_id in batch:
                    del self._queue[job_id]
                    self._flying[job_id] = self._since.pop(job_id, self._tick)
                self._inflight.update(batch)
            if batch:
                if await self._write(batch):
                    backoff = _RETRY_MIN
                else:  # NATS unreachable: retry the failed keys, backing off
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _RETRY_MAX)
            with self._lock:
                if any(job_id not in self._held for job_id in self._queue):
                    self._wake.set()
                flushers = self._due_flushers()
            for future in flushers:
                if not future.done():
                    future.set_result(None)

    def _due_flushers(self) -> list[asyncio.Future[None]]:
        """Flushers whose writes are all done: nothing outstanding is as old. Holds the lock."""
        if not self._flushers:
            return []
        oldest = min(
            min(self._since.values(), default=math.inf),
            min(self._flying.values(), default=math.inf),
        )
        due = [future for ticket, future in self._flushers if ticket < oldest]
        self._flushers = [(ticket, f) for ticket, f in self._flushers if ticket >= oldest]
        return due

    async def _write(self, batch: dict[str, bytes | None]) -> bool:
        """Compare-and-set writes of a batch, pipelined; False if some must be retried."""
        assert self._kv is not None and self._writes is not None
        with self._lock:  # a delete of a key KV never had has nothing to do
            writes = [
                (job_id, data, self._revisions.get(job_id, 0))
                for job_id, data in batch.items()
                if data is not None or job_id in self._revisions
            ]
        outcomes: dict[str, Outcome | None] = dict.fromkeys(batch)
        for (job_id, data, last), outcome in zip(
            writes, await self._writes.send(writes), strict=True
        ):
            if last == 0 and isinstance(outcome, nats.js.errors.KeyWrongLastSequenceError):
                # A create over a deleted key must name the deletion's revision: nats-py's
                # create() looks it up (and still fails if the key holds a value).
                assert data is not None
                try:
                    outcome = await self._kv.create(job_id, data)
                except (nats.errors.Error, TimeoutError, OSError) as exc:
                    outcome = exc
            outcomes[job_id] = outcome
        failed = [(job_id, result) for job_id, result in outcomes.items() if _is_transient(result)]
        if failed:
            logger.bind(bucket=self.bucket).error(
                "writing {} job(s) failed, retrying: {} (first: {!r})",
                len(failed),
                failed[0][1],
                failed[0][0],
            )
        for job_id, result in outcomes.items():
            await self._settle(job_id, batch[job_id], result)
        return not failed

    async def _settle(self, job_id: str, data: bytes | None, outcome: Outcome | None) -> None:
        """Record one write's outcome (None: nothing was written) and answer its waiters."""
        error: BaseException | None = None
        with self._lock:
            ticket = self._flying.pop(job_id, self._tick)
        if isinstance(outcome, int):
            with self._lock:
                self._revisions[job_id] = max(outcome, self._revisions.get(job_id, 0))
        elif _is_transient(outcome):
            error = StoreError(f"writing job {job_id!r} failed: {outcome}")
            with self._lock:  # retry later unless something newer is queued
                self._queue.setdefault(job_id, data)
                self._since[job_id] = min(ticket, self._since.get(job_id, ticket))
        elif outcome is not None:
            error = WriteConflict(f"job {job_id!r} was changed by another writer")
            logger.bind(job_id=job_id).info(
                "write lost a compare-and-set race; reloading ({!r})", outcome
            )
            await self._resync(job_id)
        with self._lock:
            self._inflight.pop(job_id, None)
            newer = job_id in self._queue or job_id in self._deferred
            waiters = [] if newer else self._waiters.pop(job_id, [])
        for future in waiters:
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    def _spawn_resync(self, job_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._resync(job_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resync(self, job_id: str) -> None:
        """After a lost race, make the local copy what KV holds now.

        Read from the stream leader, not with a direct get: in a cluster a direct get may
        be answered by a replica that lags behind, and applying its older version would
        make the scheduler fire a recorded slot again.
        """
        assert self._nc is not None
        try:
            msg = await self._nc.jetstream().get_msg(
                f"KV_{self.bucket}", subject=f"$KV.{self.bucket}.{job_id}", direct=False
            )
            headers = msg.headers or {}
            deleted = headers.get(_KV_OP) in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers
            value, revision = (None if deleted else msg.data), int(msg.seq or 0)
        except nats.js.errors.NotFoundError:
            value, revision = None, 0
        except (nats.errors.Error, TimeoutError) as exc:
            logger.bind(job_id=job_id).warning("reloading job after a conflict failed: {}", exc)
            return
        with self._lock:
            if revision and revision < self._revisions.get(job_id, 0):
                return  # the watch already brought something newer
            self._revisions[job_id] = max(revision, self._revisions.get(job_id, 0))
            self._drop_queued(job_id)
            self._apply(job_id, value)
        self._wakeup_scheduler()

    # --- the watch -----------------------------------------------------------------------------

    async def _watch(self) -> None:
        """The watch task: entries are handled in the feed's callback; this task ends (and
        the store fails) if handling one raised."""
        assert self._nc is not None
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        feed = KVFeed(self._nc, self.bucket, handler=lambda entry: self._on_feed(entry, failed))
        self._feed = feed
        await feed.start()
        try:
            await failed
        finally:
            self._feed = None
            await feed.stop()

    def _on_feed(self, entry: KeyValue.Entry | None, failed: asyncio.Future[None]) -> None:
        assert self._loaded is not None
        if failed.done():
            return
        try:
            if entry is None:
                with self._lock:
                    self._index_bulk()
                self._loaded.set()
                self._wakeup_scheduler()
                return
            revision = entry.revision or 0
            changed = self._on_entry(entry.key, entry.value, revision, entry.operation)
            self._applied_seq = max(self._applied_seq, revision)
            if changed and self._loaded.is_set() and not entry.delta:
                self._wakeup_scheduler()
            if self._sync_waiters:
                self._wake_sync_waiters()
        except Exception as exc:  # a bug: fail the watch task (and the store) loudly
            failed.set_exception(exc)

    async def catch_up(self, timeout: float) -> bool:
        """Wait until the index holds every change that is in KV now; False on timeout.

        A new leader calls this before it fires: its watch may have been behind (a
        server restart, the death of the node holding its consumer), and a stale index
        would fire slots again that the previous leader already fired. A watch that
        makes no progress for a moment is re-created from where it stopped.
        """
        assert self._nc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:  # right after a node restart the stream may have no leader for a bit
            remaining = deadline - loop.time()
            try:
                info = await asyncio.wait_for(
                    self._nc.jetstream().stream_info(f"KV_{self.bucket}"), max(remaining, 0.01)
                )
                break
            except (nats.errors.Error, TimeoutError) as exc:
                if deadline - loop.time() <= _RETRY_MIN:
                    logger.bind(bucket=self.bucket).warning("cannot check the job watch: {}", exc)
                    return False
                await asyncio.sleep(_RETRY_MIN)
        target = int(info.state.last_seq)
        stall = min(0.5, timeout / 4)
        while self._applied_seq < target:
            remaining = deadline - loop.time()
            if remaining <= 0:
                logger.bind(bucket=self.bucket).warning(
                    "job watch still behind KV ({} < {})", self._applied_seq, target
                )
                return False
            future: asyncio.Future[None] = loop.create_future()
            self._sync_waiters.append((target, future))
            seen = self._applied_seq
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, min(stall, remaining))
            if self._applied_seq == seen and self._feed is not None:
                self._feed.resume()  # no progress: the consumer is probably gone
        return True

    def _wake_sync_waiters(self) -> None:
        keep = []
        for target, future in self._sync_waiters:
            if future.done():
                continue
            if self._applied_seq >= target:
                future.set_result(None)
            else:
                keep.append((target, future))
        self._sync_waiters = keep

    def _on_entry(
        self, job_id: str, value: bytes | None, revision: int, operation: str | None
    ) -> bool:
        """Apply one watched KV entry; True if the local view changed."""
        deleted = operation in ("DEL", "PURGE") or value is None
        self._applied += 1
        with self._lock:
            known = self._revisions.get(job_id, 0)
            if revision <= known:
                return False  # our own write (acknowledged already) or older
            self._revisions[job_id] = revision
            if deleted and job_id in self._inflight and self._inflight[job_id] is _DELETE:
                return False  # the echo of our own delete, ahead of its ack
            if not deleted and _is_own(value, self.writer_id):
                return False  # the echo of our own write
            self._drop_queued(job_id)  # local changes were based on an older version
            self._apply(job_id, None if deleted else value)
            return True

    def _drop_queued(self, job_id: str) -> None:
        """Discard a queued write that a newer remote version overtook. Holds the lock."""
        deferred = self._deferred.pop(job_id, None)
        if self._queue.pop(job_id, _MISSING) is _MISSING and deferred is None:
            return
        self._since.pop(job_id, None)
        if self._flushers:
            self._kick()
        if job_id in self._inflight:
            return  # its waiters are answered when the in-flight write ends
        error = WriteConflict(f"job {job_id!r} was changed by another writer")
        for future in self._waiters.pop(job_id, []):
            self._bridge_resolve(future, error)

    def _bridge_resolve(self, future: asyncio.Future[None], error: BaseException) -> None:
        if self._bridge is not None and not future.done():
            self._bridge.soon(_set_exception, future, error)

    def _apply(self, job_id: str, value: bytes | None) -> None:
        """Replace the local copy of `job_id` with KV's (None: deleted). Holds the lock."""
        if self._bulk is not None:
            self._bulk.pop(job_id, None)
        old = self._index.lookup_job(job_id)
        if old is not None:
            self._index.remove_job(job_id)
            self._stale[id(old)] = old
        self._skipped.pop(job_id, None)
        if value is None:
            return
        try:
            record = decode_record(value)
            if record.get("id") != job_id:
                raise RecordError(f"record id {record.get('id')!r} does not match its key")
            func = self._resolver.resolve(str(record.get("func")))
            job = build_job(record, func)
        except RecordError as exc:
            self._skipped[job_id] = str(exc)
            logger.bind(bucket=self.bucket, job_id=job_id).warning(
                "skipping job record (kept in KV, never run): {}", exc
            )
            return
        self._attach(job)
        if self._bulk is not None:
            self._bulk[job_id] = job
        else:
            self._index.add_job(job)

    def _index_bulk(self) -> None:
        """Index the jobs of the initial load with one sort. Holds the lock.

        `MemoryJobStore.add_job` costs a pure-Python bisection and a list insert per job,
        quadratic over a load of 100,000 jobs in random next-run order. This builds the same
        structure (APScheduler 3's: a list of (job, timestamp) sorted by timestamp, None
        last, then id; and an id -> entry dict) in one go.
        """
        jobs, self._bulk = self._bulk or {}, None
        entries = list(self._index._jobs)
        entries.extend((job, datetime_to_utc_timestamp(job.next_run_time)) for job in jobs.values())
        entries.sort(key=lambda e: (math.inf if e[1] is None else e[1], e[0].id))
        self._index._jobs = entries
        self._index._jobs_index = {entry[0].id: entry for entry in entries}

    def _reindex(self, job: Job) -> None:
        """`MemoryJobStore.update_job`, skipped when it would change nothing. Holds the lock.

        A nats-cron fire updates its job twice, the second time (run state) with the same
        next run time: re-sorting the index for it cost a pure-Python bisection per fire.
        """
        entry = self._index._jobs_index.get(job.id)
        if (
            entry is not None
            and entry[0] is job
            and entry[1] == datetime_to_utc_timestamp(job.next_run_time)
        ):
            return
        self._index.update_job(job)

    def _is_stale(self, job: Job) -> bool:
        return bool(self._stale) and self._stale.get(id(job)) is job

    def _attach(self, job: Job) -> None:
        if self._scheduler is not None:
            job._scheduler = self._scheduler
            job._jobstore_alias = self._alias

    def _wakeup_scheduler(self) -> None:
        scheduler = self._scheduler
        if scheduler is not None and scheduler.running:
            scheduler.wakeup()

    def __repr__(self) -> str:
        return f"<JetStreamJobStore (bucket={self.bucket!r})>"


def _is_transient(outcome: Outcome | None) -> bool:
    """A write that failed for want of NATS (retried), not because of what KV holds."""
    if isinstance(outcome, nats.js.errors.ServiceUnavailableError):
        return True
    if isinstance(outcome, nats.js.errors.APIError):
        return False  # a lost compare-and-set race, or a write the stream refuses
    return isinstance(outcome, nats.errors.Error | TimeoutError | OSError)


def _set_exception(future: asyncio.Future[None], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _is_own(value: bytes | None, writer_id: str) -> bool:
    # Cheap check without a full decode: our records end with `"writer":"<id>"}`.
    return value is not None and value.endswith(f'"writer":"{writer_id}"}}'.encode())
