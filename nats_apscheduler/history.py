"""Run history: the events stream, and the run state of every job rebuilt from it.

Every run outcome is an event, a JSON object published on `<prefix>.<job subject>`
(`nats-cron.events.<job subject>` by default; deployments, or tests, sharing one server
each take their own prefix) and kept by a stream with a per-subject limit. An event has
`subject`, `scheduled`, `actual`, `attempt`, `outcome`, `duration`, `error` (and more: see
the README), and carries what is needed to rebuild a job's run state from it alone: the
job's run count so far, and its last success and consecutive failures where the outcome
does not tell them; an event of slots that did not fire (`missed`, `skipped`) carries the
last run's fields instead.

`RunStates` holds that run state for every job: the leader writes it as it fires; the
other instances follow the stream (the last record per job, then every new one), so that
every instance answers `get` and `list` with it. A new leader catches the feed up before
it fires, then pauses it: while leading, its own memory is the newest state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from loguru import logger
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, StreamConfig
from nats.js.kv import KeyValue

from nats_apscheduler._watch import Feed
from nats_apscheduler.protocol import EVENTS_PREFIX


class History:
    """The events stream of one deployment."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        depth: int,
        replicas: int = 1,
        prefix: str = EVENTS_PREFIX,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.stream = stream
        self.depth = depth
        self.replicas = replicas
        self.prefix = prefix

    def subject(self, job_subject: str) -> str:
        return f"{self.prefix}.{job_subject}"

    async def ensure(self) -> None:
        config = StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.>"],
            max_msgs_per_subject=self.depth,
            discard=DiscardPolicy.OLD,
            num_replicas=self.replicas,
            allow_direct=True,
        )
        try:
            await self._js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await self._js.update_stream(config)

    async def read(self, subject: str, limit: int) -> list[dict[str, Any]]:
        """The most recent `limit` records of `subject`, newest first."""
        sub = await self._js.subscribe(
            self.subject(subject), stream=self.stream, ordered_consumer=True
        )
        records: list[dict[str, Any]] = []
        try:
            info = await sub.consumer_info()
            # Some messages may already sit in our queue: count delivered plus pending.
            delivered = info.delivered.consumer_seq if info.delivered else 0
            for _ in range((delivered or 0) + (info.num_pending or 0)):
                msg = await sub.next_msg(timeout=2)
                try:
                    records.append(json.loads(msg.data))
                except ValueError:
                    continue
        finally:
            await sub.unsubscribe()
        records.reverse()
        return records[:limit]

    async def purge(self, subject: str) -> None:
        """Forget every record of `subject` (its job was deleted)."""
        await self._js.purge_stream(self.stream, subject=self.subject(subject))


@dataclass(slots=True)
class RunState:
    last_scheduled: str | None = None
    last_run: str | None = None
    run_count: int = 0
    last_error: str | None = None
    last_outcome: str | None = None
    last_success: str | None = None  #: `actual` of the last fire (publish) or success
    consecutive_failures: int = 0  #: failed attempts since the last success

    def to_dict(self) -> dict[str, Any]:
        return {
            "last_scheduled": self.last_scheduled,
            "last_run": self.last_run,
            "run_count": self.run_count,
            "last_error": self.last_error,
            "last_outcome": self.last_outcome,
            "last_success": self.last_success,
            "consecutive_failures": self.consecutive_failures,
        }


#: Outcomes that mean the message was handed over: a publish (`fired`, `caught_up`), a
#: reply (`succeeded`), a PubAck (`stored`).
SUCCESS_OUTCOMES = frozenset({"fired", "caught_up", "succeeded", "stored"})
#: Outcomes of an attempt that did not deliver (`error`: records of earlier versions).
FAILURE_OUTCOMES = frozenset({"failed", "timeout", "no_responders", "error"})
#: Outcomes of a run that delivered (or tried to deliver) a message; others (`missed`,
#: `skipped`) only report slots that were not fired.
RUN_OUTCOMES = SUCCESS_OUTCOMES | FAILURE_OUTCOMES


class RunStates:
    """Run state per job subject, from this leader's fires and the history stream."""

    def __init__(self, history: History | None = None) -> None:
        self._history = history
        self._states: dict[str, RunState] = {}
        self._feed: Feed | None = None
        self._refreshed = float("-inf")  # loop time of the last full refresh
        #: Records of these job subjects are not applied (this instance writes them itself).
        self.ignore: Callable[[str], bool] = lambda subject: False

    def get(self, subject: str) -> RunState | None:
        return self._states.get(subject)

    def state(self, subject: str) -> RunState:
        state = self._states.get(subject)
        if state is None:
            state = self._states[subject] = RunState()
        return state

    def drop(self, subject: str) -> None:
        self._states.pop(subject, None)

    def apply(self, record: dict[str, Any]) -> None:
        """A history record, as another instance wrote it."""
        subject = record.get("subject")
        if not isinstance(subject, str):
            return
        state = self.state(subject)
        outcome = record.get("outcome")
        state.last_outcome = outcome if isinstance(outcome, str) else None
        if outcome in RUN_OUTCOMES:
            state.last_scheduled = record.get("scheduled")
            state.last_run = record.get("actual")
            state.last_error = record.get("error")
        else:  # a record of slots not fired carries the run state as it stood
            state.last_scheduled = record.get("last_scheduled")
            state.last_run = record.get("last_run")
            state.last_error = record.get("last_error")
        runs = record.get("runs")
        if isinstance(runs, int) and not isinstance(runs, bool):
            state.run_count = runs
        if outcome in SUCCESS_OUTCOMES:
            state.last_success = record.get("actual")
            state.consecutive_failures = 0
        else:  # carried by the record where the outcome does not tell
            if "last_success" in record:
                state.last_success = record.get("last_success")
            failures = record.get("consecutive_failures")
            if isinstance(failures, int) and not isinstance(failures, bool):
                state.consecutive_failures = failures

    # --- following the stream -----------------------------------------------------------------

    @property
    def following(self) -> bool:
        return self._feed is not None

    async def follow(self, nc: Client) -> None:
        """Follow the history stream (the last record per job, then every new one)."""
        if self._feed is not None or self._history is None:
            return

        def handle(entry: KeyValue.Entry | None) -> None:
            if entry is not None and not self.ignore(entry.key):
                self._apply_data(entry.value)

        history = self._history
        feed = self._feed = Feed(nc, history.stream, history.prefix + ".", handler=handle)
        await feed.start()

    async def catch_up(self, timeout: float) -> bool:
        """Wait until the run state holds every record the stream holds now."""
        if self._feed is None:
            return True
        return await self._feed.catch_up(timeout)

    # --- with shards: other leaders' run state read when asked, a won shard's when won --

    async def refresh(self, nc: Client, subjects: list[str] | None, max_age: float = 2.0) -> None:
        """Make the run state of `subjects` (None: every job) as fresh as the stream, for the
        jobs this instance does not fire itself (`ignore`): one direct get per subject, or
        one read of the last record of every job, at most every `max_age` seconds."""
        if self._history is None:
            return
        loop = asyncio.get_running_loop()
        if subjects is None:
            if loop.time() - self._refreshed < max_age:
                return
            self._refreshed = loop.time()
            await self.load(nc, lambda subject: not self.ignore(subject), timeout=10)
            return
        js = nc.jetstream()
        for subject in subjects:
            if self.ignore(subject):
                continue
            try:
                msg = await js.get_msg(
                    self._history.stream, subject=self._history.subject(subject), direct=True
                )
            except nats.js.errors.NotFoundError:
                continue
            except (nats.errors.Error, TimeoutError) as exc:
                logger.debug("reading the run state of {}: {}", subject, exc)
                continue
            self._apply_data(msg.data)

    async def load(self, nc: Client, only: Callable[[str], bool], timeout: float) -> bool:
        """Read the last record of every job from the stream and apply those of the jobs
        `only` accepts (the shard just won); False if that did not finish in time."""
        if self._history is None:
            return True
        loaded = asyncio.get_running_loop().create_future()

        def handle(entry: KeyValue.Entry | None) -> None:
            if entry is None:
                if not loaded.done():
                    loaded.set_result(None)
                return
            if only(entry.key):
                self._apply_data(entry.value)

        history = self._history
        feed = Feed(nc, history.stream, history.prefix + ".", handler=handle)
        try:
            await feed.start()
            await asyncio.wait_for(asyncio.shield(loaded), timeout)
            return True
        except (TimeoutError, nats.errors.Error) as exc:
            logger.warning("loading the run history: {}", str(exc) or type(exc).__name__)
            return False
        finally:
            with contextlib.suppress(nats.errors.Error, OSError):
                await feed.stop()

    def _apply_data(self, data: bytes | None) -> None:
        """Apply one encoded run record (the last of its job); one that is not a JSON
        object is passed over."""
        try:
            record = json.loads(data or b"")
        except ValueError:
            return
        if isinstance(record, dict):
            self.apply(record)

    async def pause(self) -> None:
        """Stop following (this instance leads: it knows the newest state itself). A later
        `follow()` starts over from the last record per job."""
        feed, self._feed = self._feed, None
        if feed is not None:
            try:
                await feed.stop()
            except (nats.errors.Error, OSError) as exc:  # pragma: no cover - best effort
                logger.debug("stopping the history feed: {}", exc)
