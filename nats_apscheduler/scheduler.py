"""`BatchScheduler`: APScheduler's asyncio scheduler, processing due jobs through the terms of
the shards this instance leads, in bounded slices, instead of APScheduler's job-by-job
`_process_jobs`.

APScheduler keeps what it does well here: the timer on the event loop (`wakeup`, the
wait until the next due job), `pause`/`resume` (the election adapter's switch), and the
job store as the source of jobs. What a due job costs is the term's: no executor, no
event per job, no store write per fire.
"""

from __future__ import annotations

import asyncio
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_PAUSED

from nats_apscheduler.term import Term


class BatchScheduler(AsyncIOScheduler):  # type: ignore[misc]
    """Works through the due jobs of every term it holds (one per shard this instance
    leads), a slice of each per call; idle without terms. See the module docstring."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.terms: dict[int, Term] = {}

    @property
    def term(self) -> Term | None:
        """The term of shard 0 (the only one of a deployment without shards)."""
        return self.terms.get(0)

    def add_term(self, shard: int, term: Term) -> None:
        self.terms[shard] = term
        self.wakeup()

    def remove_term(self, shard: int) -> None:
        self.terms.pop(shard, None)

    def _process_jobs(self) -> float | None:
        if self.state == STATE_PAUSED or not self.terms:
            return None
        wait: float | None = None
        for term in list(self.terms.values()):
            due = term.process()
            if due is not None and (wait is None or due < wait):
                wait = due
        return wait

    # APScheduler's timer calls `wakeup`, which goes through `call_soon_threadsafe` (a
    # self-pipe write and read, and an extra turn of the loop, per wake). On the loop's own
    # thread a plain timer does: at 1,000 wakes a second that was 2 syscalls per fire.

    def _start_timer(self, wait_seconds: float | None) -> None:
        self._stop_timer()
        if wait_seconds is not None:
            loop = self._eventloop
            if wait_seconds <= 0:
                self._timeout = loop.call_soon(self._tick)  # the next slice, after I/O
            else:
                self._timeout = loop.call_later(wait_seconds, self._tick)

    def _tick(self) -> None:
        self._timeout = None
        self._start_timer(self._process_jobs())

    def wakeup(self) -> None:
        loop = self._eventloop
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if not here:
            super().wakeup()
        elif not isinstance(self._timeout, asyncio.Handle) or isinstance(
            self._timeout, asyncio.TimerHandle
        ):
            self._start_timer(0)  # (a burst of changes wakes it once, not once per change)
