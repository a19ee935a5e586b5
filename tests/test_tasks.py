"""`cancel_and_wait`: stopping a task whose cancel Python 3.11's `wait_for` may drop."""

from __future__ import annotations

import asyncio
import sys

from nats_apscheduler._tasks import cancel_and_wait


async def _request_then_wait_for_ever(reply: asyncio.Future[int], forever: asyncio.Event) -> None:
    await asyncio.wait_for(reply, 10)  # a nats-py request, in miniature
    await forever.wait()  # e.g. the store's watch waiting for a failure


async def test_a_task_whose_cancel_was_lost_is_cancelled_again() -> None:
    reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    forever = asyncio.Event()
    task = asyncio.create_task(_request_then_wait_for_ever(reply, forever))
    await asyncio.sleep(0)  # the task now waits for the reply
    reply.set_result(1)  # the reply arrives ...
    task.cancel()  # ... in the loop turn of the cancel
    await asyncio.sleep(0.05)
    if sys.version_info < (3, 12):
        assert not task.done()  # CPython gh-86296: the cancel was lost
    await asyncio.wait_for(cancel_and_wait([task], grace=0.05), 2)
    assert task.cancelled()


async def test_a_task_that_fails_while_cancelled_does_not_warn() -> None:
    async def fail_on_cancel() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(fail_on_cancel())
    await asyncio.sleep(0)
    await cancel_and_wait([task, None])
    assert isinstance(task.exception(), RuntimeError)
