"""`JetStreamJobStore`: an APScheduler 3 job store persisting jobs in a JetStream KV bucket.

The store is a translator between APScheduler's synchronous store contract and three
parts, each testable on its own:

- `Mirror` (`_mirror.py`, pure): the in-memory copy of the bucket. Every read
  (`lookup_job`, `get_due_jobs`, `get_next_run_time`, `get_all_jobs`) is served from it and
  never touches the network.
- `WriteBack` (`_writeback.py`): writes (`add_job`, `update_job`, `remove_job`) change the
  mirror at once, raising APScheduler's `ConflictingIdError` / `JobLookupError` as its
  contract says, and queue the KV write; one task drains the queue, coalescing repeated
  writes to a key and pipelining different keys, each a compare-and-set on the revision
  the mirror knows. `flush()` / `await aflush()` wait until every change made before the
  call is in KV; `await apersist(job_id)` waits for one job and raises `WriteConflict` if
  another writer won (the other writer's version is then the local one).
- `KVFeed` (`_watch.py`): the watch that keeps the mirror current with what other
  processes write; a remote change replaces the local copy and wakes the scheduler.

Threading: all NATS I/O runs on one asyncio loop, the loop of a connection the application
passes in (`nc=`) or a private loop on a daemon thread when the store connects by itself.
APScheduler calls the store from its own thread (Background/Blocking schedulers) or from
that same loop (AsyncIOScheduler). Only `start()` (the initial load) and `flush()` block;
on the loop's own thread they would deadlock, so they raise `BridgeError` there: with a
shared loop, `await store.open()` before `scheduler.start()` and `await store.aclose()`
after shutdown.

Records are versioned JSON (see `codec`), never pickle. A record's function reference is
resolved only through the allow-list; an unreadable record or one naming a function off
the list is logged and skipped: it stays in KV, is never executed and never deleted
unless someone removes that job id explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import nats
import nats.errors
import nats.js.errors
from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore
from apscheduler.util import obj_to_ref, ref_to_obj
from loguru import logger
from nats.aio.client import Client
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from nats_apscheduler._bridge import LoopBridge
from nats_apscheduler._kvwrite import KVWrites
from nats_apscheduler._mirror import Mirror, Raw
from nats_apscheduler._tasks import cancel_and_wait
from nats_apscheduler._watch import KVFeed
from nats_apscheduler._writeback import WriteBack
from nats_apscheduler.codec import RecordEncoder, build_job, decode_record, peek_next_run_time
from nats_apscheduler.errors import RecordError, StoreError
from nats_apscheduler.protocol import is_kv_delete

DEFAULT_BUCKET = "nats-cron-jobs"
FIRE_REF = "nats_apscheduler.fire:fire"
# Changes (of any job, by anyone) after which the GC freezes what is alive: at once when
# a burst of changes ends, and every so many while one goes on.
_FREEZE_IDLE, _FREEZE_EVERY = 500, 5000
# Valid KV keys (nats-py's own rule): no leading or trailing dot.
_KEY = re.compile(r"^[-/_=\.a-zA-Z0-9]+$")


class State(enum.Enum):
    NEW = "new"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


#: Called with (job id, the job now held or None) whenever the local copy of a job changes.
ChangeListener = Callable[[str, "Job | None"], None]


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


class _Parts:
    """What an open store runs: built by `open()`, dropped by `aclose()`."""

    def __init__(self, nc: Client, kv: KeyValue, writes: KVWrites, writeback: WriteBack):
        self.nc = nc
        self.kv = kv
        self.writes = writes
        self.writeback = writeback
        self.feed: KVFeed | None = None
        self.tasks: list[asyncio.Task[None]] = []


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
        self._lock = threading.RLock()
        self._mirror = Mirror(self._decode)
        self._encoder = RecordEncoder()
        self._state = State.NEW
        self._parts: _Parts | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._applied = 0  # watched entries handled (load progress)
        self._grown = 0  # jobs changed since the GC last froze what is alive
        #: Called (on the loop) if the watch or writer task dies; the service exits on it.
        self.on_failure: Callable[[BaseException], None] | None = None
        #: Called on every change of the local copy of a job (see `ChangeListener`).
        self.on_change: ChangeListener | None = None

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    async def open(self) -> None:
        """Connect (if needed), create/bind the bucket and load every job. Idempotent."""
        if self._state is State.OPEN:
            return
        self._state = State.OPENING
        loop = asyncio.get_running_loop()
        if self._bridge is None:
            self._bridge = LoopBridge(loop)
        if self._nc is None:
            self._nc = await nats.connect(self._url, **self._connect_options)
        js = self._nc.jetstream()
        try:
            kv = await js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            config = KeyValueConfig(bucket=self.bucket, replicas=self.replicas, direct=True)
            kv = await js.create_key_value(config)
        with self._lock:  # a reopened store reloads everything from the watch
            self.writer_id = uuid.uuid4().hex  # ...including what it wrote itself before
            self._mirror = Mirror(self._decode)
        try:
            await self._load(loop, kv)
        except BaseException:
            await self.aclose()
            raise
        self._state = State.OPEN
        logger.bind(bucket=self.bucket).debug("job store loaded {} jobs", len(self._mirror))

    async def _load(self, loop: asyncio.AbstractEventLoop, kv: KeyValue) -> None:
        assert self._nc is not None and self._bridge is not None
        writes = KVWrites(self._nc, self.bucket)
        await writes.start()
        writeback = WriteBack(
            writes,
            revision_of=self.revision,
            written=self._written,
            conflict=self._resync,
            create=kv.create,
            soon=self._bridge.soon,
        )
        parts = self._parts = _Parts(self._nc, kv, writes, writeback)
        loaded: asyncio.Future[None] = loop.create_future()
        failed: asyncio.Future[None] = loop.create_future()
        parts.feed = KVFeed(
            self._nc, self.bucket, handler=lambda e: self._on_feed(e, loaded, failed)
        )
        # The load allocates millions of objects that all stay alive: Python's cyclic GC
        # would run ~1,400 collections over the growing heap for 100,000 jobs, a third of
        # the load time (bench/profiling.py startup). Reference counting still frees.
        # Afterwards gc.freeze() keeps the loaded objects out of later collections (the
        # first full one would otherwise stall the loop ~0.5 s right when firing starts).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            await parts.feed.start()
            parts.tasks = [
                loop.create_task(self._watch(failed), name=f"jobstore-watch-{self.bucket}"),
                writeback.start(),
            ]
            for task in parts.tasks:
                task.add_done_callback(self._task_done)
            seen = -1
            # A large bucket takes a while: give up only when the load stops making progress.
            while not loaded.done() and not failed.done() and self._applied != seen:
                seen = self._applied
                await asyncio.wait(
                    [loaded, failed], timeout=self._timeout, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            if gc_was_enabled:
                gc.freeze()
                gc.enable()
        if not loaded.done():
            failure = failed.exception() if failed.done() else None
            if failure is not None:
                raise StoreError(f"watching bucket {self.bucket!r} failed: {failure}") from failure
            raise StoreError(f"loading bucket {self.bucket!r} stalled for {self._timeout}s")

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._state in (State.CLOSING, State.CLOSED) or task.cancelled():
            return
        exc = task.exception() or StoreError(f"{task.get_name()} ended unexpectedly")
        logger.bind(bucket=self.bucket).opt(exception=exc).error("job store task died: {}", exc)
        if self.on_failure is not None:
            self.on_failure(exc)

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        if self._state is not State.OPEN:
            if self._bridge is None and self._own_nc:
                self._bridge = LoopBridge.on_new_thread(f"jobstore-{self.bucket}")
            if self._bridge is None:
                raise StoreError("await store.open() on the connection's loop before starting")
            self._bridge.call(self.open(), self._timeout + 5, "JetStreamJobStore.start()")
        with self._lock:
            for _, _, job in self._mirror.records():
                if job is not None:
                    self._attach(job)

    def shutdown(self) -> None:
        """Stop watching and flush queued writes. Never deletes jobs (unlike MemoryJobStore)."""
        if self._bridge is None:
            return
        if self._bridge.in_loop_thread():
            # Cannot wait here; the application awaits aclose() to flush.
            self._spawn(self.aclose())
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
        parts, self._parts = self._parts, None
        if self._state is State.CLOSED or parts is None:
            self._state = State.CLOSED
            return
        self._state = State.CLOSING
        writer = parts.tasks[1] if len(parts.tasks) > 1 else None
        if writer is not None and not writer.done():
            try:
                await asyncio.wait_for(parts.writeback.flush(), self._timeout)
            except TimeoutError:
                logger.warning(
                    "job store closed with {} unwritten changes", parts.writeback.unwritten()
                )
        await cancel_and_wait(parts.tasks)  # a plain cancel can be lost (see _tasks)
        await parts.writeback.stop()
        if parts.feed is not None:
            await parts.feed.stop()
        await parts.writes.stop()
        self._state = State.CLOSED
        if self._own_nc and self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    # --- reads: memory only ---------------------------------------------------------------

    def lookup_job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._mirror.lookup(job_id)

    def get_due_jobs(self, now: Any) -> list[Job]:
        with self._lock:
            return self._mirror.due(now)

    def get_next_run_time(self) -> Any:
        with self._lock:
            return self._mirror.next_run_time()

    def get_all_jobs(self) -> list[Job]:
        with self._lock:
            jobs = self._mirror.all()
        self._fix_paused_jobs_sorting(jobs)
        return jobs

    def jobs(self) -> list[Job]:
        """Every job, in no particular order (cheaper than `get_all_jobs()`)."""
        with self._lock:
            return list(self._mirror)

    def records(self) -> list[tuple[str, Any, Job | None]]:
        """(id, next run time, the job if decoded) of every job, decoding nothing: how a new
        leader builds its agenda without decoding 100,000 records first."""
        with self._lock:
            return list(self._mirror.records())

    def raw(self, job_id: str) -> bytes | None:
        """The record of a job not decoded yet (None once it is)."""
        with self._lock:
            return self._mirror.raw(job_id)

    def count(self) -> int:
        with self._lock:
            return len(self._mirror)

    def revision(self, job_id: str) -> int:
        """The KV revision of `job_id`'s last stored change this store knows of (0: none;
        a write still queued is not counted until it lands)."""
        with self._lock:
            return self._mirror.revisions.get(job_id, 0)

    @property
    def applied_seq(self) -> int:
        """The stream sequence of the last KV change the local copy holds."""
        parts = self._parts
        return parts.feed.last_seq if parts is not None and parts.feed is not None else 0

    @property
    def loaded(self) -> bool:
        """True once the initial load is done and the watch and writer run."""
        parts = self._parts
        return (
            self._state is State.OPEN
            and parts is not None
            and all(not task.done() for task in parts.tasks)
        )

    def skipped_records(self) -> dict[str, str]:
        """Job ids whose KV records were not loaded, with the reason."""
        with self._lock:
            return dict(self._mirror.skipped)

    # --- writes: memory now, KV through the write-back ------------------------------------

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
            self._mirror.add(job)
            job.func = self._resolver.resolve(job.func_ref)
            self._writeback().put(job.id, data)
        self._changed(job.id, job)

    def update_job(self, job: Job) -> None:
        with self._lock:
            if self._mirror.is_stale(job):
                return  # a copy a remote change replaced: that change wins
        try:
            data = self._encoder.encode(job, self.writer_id)
        except ValueError:
            self._reject(job)
            raise
        with self._lock:
            if self._mirror.is_stale(job):
                return  # replaced while we encoded
            self._mirror.update(job)
            self._writeback().put(job.id, data)
        self._changed(job.id, job)

    def _reject(self, job: Job) -> None:
        """APScheduler changed `job` in place into a state that cannot be stored: take it
        out of the index so it never runs so, and bring back the last accepted version."""
        writeback = self._writeback()
        with self._lock:
            self._mirror.forget(job.id, job)
            last = writeback.pending(job.id)
            if last is not None:  # still queued or in flight: that is the last accepted one
                self._apply(job.id, last)
                return
        bridge = self._bridge
        if bridge is not None and not bridge.in_loop_thread():
            with contextlib.suppress(TimeoutError, StoreError):
                bridge.call(self._resync(job.id), self._timeout, "reloading a job")
        elif bridge is not None:
            self._spawn(self._resync(job.id))  # cannot wait on the loop's own thread

    def remove_job(self, job_id: str) -> None:
        with self._lock:
            self._mirror.remove(job_id)
            self._encoder.forget(job_id)
            self._writeback().delete(job_id)
        self._changed(job_id, None)

    def remove_all_jobs(self) -> None:
        with self._lock:
            ids = self._mirror.remove_all()
            self._encoder.clear()
            for job_id in ids:
                self._writeback().delete(job_id)
        for job_id in ids:
            self._changed(job_id, None)

    def _writeback(self) -> WriteBack:
        if self._parts is None:
            raise StoreError(f"the job store of bucket {self.bucket!r} is not open")
        return self._parts.writeback

    def _changed(self, job_id: str, job: Job | None) -> None:
        self._grown += 1
        if self.on_change is not None:
            self.on_change(job_id, job)

    # --- durability --------------------------------------------------------------------------

    def flush(self) -> None:
        """Block until every queued write is in KV (not on the store's loop thread)."""
        if self._bridge is not None:
            self._bridge.call(self.aflush(), self._timeout, "JetStreamJobStore.flush()")

    async def aflush(self) -> None:
        """Wait until every change made so far has been written (or lost its race)."""
        if self._parts is not None:
            await self._parts.writeback.flush()

    async def apersist(self, job_id: str) -> None:
        """Wait for the queued write of `job_id`; WriteConflict if another writer won."""
        if self._parts is not None:
            await self._parts.writeback.persist(job_id)

    async def catch_up(self, timeout: float) -> bool:
        """Wait until the local copy holds every change that is in KV now; False on timeout.

        A new leader calls this before it fires: its watch may have been behind (a server
        restart, the death of the node holding its consumer), and a stale copy would fire
        slots of a job as it was, not as it is.
        """
        parts = self._parts
        if parts is None or parts.feed is None:
            return False
        return await parts.feed.catch_up(timeout)

    def _written(self, job_id: str, revision: int) -> None:
        with self._lock:
            self._mirror.revisions[job_id] = max(revision, self._mirror.revisions.get(job_id, 0))

    async def _resync(self, job_id: str) -> None:
        """After a lost race, make the local copy what KV holds now.

        Read from the stream leader, not with a direct get: in a cluster a direct get may
        be answered by a replica that lags behind, and applying its older version would
        bring back a state of the job that KV no longer holds.
        """
        assert self._nc is not None
        try:
            msg = await self._nc.jetstream().get_msg(
                f"KV_{self.bucket}", subject=f"$KV.{self.bucket}.{job_id}", direct=False
            )
            deleted = is_kv_delete(msg.headers)
            value, revision = (None if deleted else msg.data), int(msg.seq or 0)
        except nats.js.errors.NotFoundError:
            value, revision = None, 0
        except (nats.errors.Error, TimeoutError) as exc:
            logger.bind(job_id=job_id).warning(
                "reloading job after a conflict failed: {}", str(exc) or type(exc).__name__
            )
            return
        with self._lock:
            if revision and revision < self._mirror.revisions.get(job_id, 0):
                return  # the watch already brought something newer
            self._mirror.revisions[job_id] = max(revision, self._mirror.revisions.get(job_id, 0))
            if self._parts is not None:
                self._parts.writeback.drop(job_id)
            job = self._apply(job_id, value)
        self._changed(job_id, job)
        self._wakeup_scheduler()

    # --- the watch -----------------------------------------------------------------------------

    async def _watch(self, failed: asyncio.Future[None]) -> None:
        """Ends (and the store fails) if handling a watched entry raised."""
        await failed

    def _on_feed(
        self,
        entry: KeyValue.Entry | None,
        loaded: asyncio.Future[None],
        failed: asyncio.Future[None],
    ) -> None:
        if failed.done():
            return
        try:
            if entry is None:
                if not loaded.done():
                    loaded.set_result(None)
                self._wakeup_scheduler()
                return
            self._applied += 1
            changed = self._on_entry(entry.key, entry.value, entry.revision or 0, entry.operation)
            if changed and loaded.done() and not entry.delta:
                self._wakeup_scheduler()
            if self._grown >= _FREEZE_EVERY or (self._grown >= _FREEZE_IDLE and not entry.delta):
                # Jobs are long-lived and acyclic: keep them out of the cyclic GC's full
                # collections, which over 100,000 jobs created through the API (1.5 million
                # objects) stalled the loop past the lease TTL. Reference counting still
                # frees a job that is replaced or deleted.
                gc.freeze()
                self._grown = 0
        except Exception as exc:  # a bug: fail the watch task (and the store) loudly
            failed.set_exception(exc)

    def _on_entry(
        self, job_id: str, value: bytes | None, revision: int, operation: str | None
    ) -> bool:
        """Apply one watched KV entry; True if the local view changed."""
        deleted = operation in ("DEL", "PURGE") or value is None
        parts = self._parts
        with self._lock:
            known = self._mirror.revisions.get(job_id, 0)
            if revision <= known:
                return False  # our own write (acknowledged already) or older
            self._mirror.revisions[job_id] = revision
            if deleted and parts is not None and parts.writeback.is_deleting(job_id):
                return False  # the echo of our own delete, ahead of its ack
            if not deleted and _is_own(value, self.writer_id):
                return False  # the echo of our own write
            if parts is not None:
                parts.writeback.drop(job_id)  # local changes were based on an older version
            if self._state is State.OPENING and not deleted and value is not None:
                # The initial load: decoded when first needed (see `Mirror`).
                try:
                    self._mirror.replace(job_id, Raw(value, peek_next_run_time(value)))
                    return True
                except ValueError:
                    pass  # decoded now, to be skipped with its reason
            job = self._apply(job_id, None if deleted else value)
        self._changed(job_id, job)
        return True

    def _apply(self, job_id: str, value: bytes | None) -> Job | None:
        """Replace the local copy of `job_id` with KV's (None: deleted). Holds the lock."""
        if value is None:
            self._mirror.replace(job_id, None)
            return None
        result = self._decode(job_id, value)
        if isinstance(result, str):
            self._mirror.replace(job_id, None, skipped=result)
            return None
        self._mirror.replace(job_id, result)
        return result

    def _decode(self, job_id: str, value: bytes) -> Job | str:
        """The job of a KV record, or why it is skipped (logged: it stays in KV, never run)."""
        try:
            record = decode_record(value)
            if record.get("id") != job_id:
                raise RecordError(f"record id {record.get('id')!r} does not match its key")
            func = self._resolver.resolve(str(record.get("func")))
            job = build_job(record, func)
        except RecordError as exc:
            logger.bind(bucket=self.bucket, job_id=job_id).warning(
                "skipping job record (kept in KV, never run): {}", exc
            )
            return str(exc)
        self._attach(job)
        return job

    def _attach(self, job: Job) -> None:
        if self._scheduler is not None:
            job._scheduler = self._scheduler
            job._jobstore_alias = self._alias

    def _wakeup_scheduler(self) -> None:
        scheduler = self._scheduler
        if scheduler is not None and scheduler.running:
            scheduler.wakeup()

    def _spawn(self, coro: Any) -> None:
        assert self._bridge is not None

        def spawn() -> None:
            task = asyncio.get_running_loop().create_task(coro)
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        self._bridge.soon(spawn)

    def __repr__(self) -> str:
        return f"<JetStreamJobStore (bucket={self.bucket!r})>"


def _is_own(value: bytes | None, writer_id: str) -> bool:
    # Cheap check without a full decode: our records end with `"writer":"<id>"}`.
    return value is not None and value.endswith(f'"writer":"{writer_id}"}}'.encode())
