"""`BatchScheduler`: APScheduler's asyncio scheduler, processing due jobs through a leader's
`Term` in bounded slices instead of APScheduler's job-by-job `_process_jobs`.

APScheduler keeps what it does well here: the timer on the event loop (`wakeup`, the
wait until the next due job), `pause`/`resume` (the election adapter's switch), and the
job store as the source of jobs. What a due job costs is the term's: no executor, no
event per job, no store write per fire.
"""

from __future__ import annotations

from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_PAUSED

from nats_apscheduler.term import Term


class BatchScheduler(AsyncIOScheduler):  # type: ignore[misc]
    """Runs while this instance leads (resumed), paused otherwise; see the module docstring."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.term: Term | None = None

    def _process_jobs(self) -> float | None:
        term = self.term
        if self.state == STATE_PAUSED or term is None:
            return None
        return term.process()
