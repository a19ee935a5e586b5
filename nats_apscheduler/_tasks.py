"""Stopping tasks when a cancel can be lost.

On Python 3.11 `asyncio.wait_for` drops a cancel that lands in the loop turn in which the
future it waits for completed: it returns that future's result instead of raising
CancelledError (CPython gh-86296; 3.12 rewrote `wait_for` on `asyncio.timeout`). Every
nats-py request goes through `wait_for`, so a task cancelled while a reply is arriving
carries on; one that then waits for something only a cancel ends never stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

GRACE = 0.5  # seconds a cancelled task gets to end before it is cancelled again


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None], grace: float = GRACE) -> None:
    """Cancel `tasks` and wait until they have ended, cancelling again any task that is
    still running `grace` seconds after its last cancel. Their outcomes are not raised."""
    given = [task for task in tasks if task is not None]
    pending = {task for task in given if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=grace)
    for task in given:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" warning
