"""`LevelGate`: wait until a monotonically rising level reaches a target. Loop-only, pure asyncio.

One mechanism for every "wait until everything up to here is done" of the store: flush
waiters (the level is the oldest change still unwritten), catch-up waiters (the level is
the stream sequence the watch has applied). Trio's `ParkingLot` is the model: waiters park
with their target; the owner raises the level and wakes exactly those it reached.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools


class LevelGate:
    def __init__(self, level: int = 0) -> None:
        self._level = level
        self._parked: list[tuple[int, int, asyncio.Future[None]]] = []  # (target, n, future)
        self._n = itertools.count()

    @property
    def level(self) -> int:
        return self._level

    def raise_to(self, level: int) -> None:
        """Set the level (it never goes down) and wake every waiter it reached."""
        if level <= self._level and not self._parked:
            return
        self._level = max(self._level, level)
        while self._parked and self._parked[0][0] <= self._level:
            _, _, future = heapq.heappop(self._parked)
            if not future.done():
                future.set_result(None)

    async def wait(self, target: int, timeout: float | None = None) -> bool:
        """True once the level is at least `target`; False on timeout."""
        if self._level >= target:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._parked, (target, next(self._n), future))
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return False
        finally:
            if not future.done():
                future.cancel()  # dropped from the heap lazily, at the next raise
        return True

    def fail_all(self, error: BaseException) -> None:
        """Wake every waiter with `error` (the owner is closing)."""
        parked, self._parked = self._parked, []
        for _, _, future in parked:
            if not future.done():
                future.set_exception(error)

    def __len__(self) -> int:
        return sum(1 for _, _, future in self._parked if not future.done())
