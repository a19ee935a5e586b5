"""Waiting for a condition with a deadline, written once (no `sleep` and hope).

`eventually` polls on the event loop (state changed by callbacks on the same loop);
`eventually_blocking` polls from a plain thread (a store's own thread, a child process).
Both raise AssertionError naming `what` when the deadline passes (`what` may be a
callable, to describe the state at that moment).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

What = str | Callable[[], str]


def _failed(timeout: float, what: What) -> str:
    return f"not within {timeout}s: {what() if callable(what) else what}"


async def eventually(
    check: Callable[[], object],
    timeout: float = 10.0,
    what: What = "the condition",
    *,
    step: float = 0.01,
    in_thread: bool = False,
) -> Any:
    """Until `check()` is true, at most `timeout` seconds; returns that true value. `check`
    may be a coroutine function (a NATS request); `in_thread` runs a blocking check (an
    HTTP GET) off the loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check) if in_thread else check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, _failed(timeout, what)
        await asyncio.sleep(step)


def eventually_blocking(
    check: Callable[[], object], timeout: float, what: What = "the condition", step: float = 0.002
) -> None:
    """The same from a thread that may block (not on a running event loop)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # a wait that an interpreter shutdown can interrupt
    while not check():
        assert time.monotonic() < deadline, _failed(timeout, what)
        pause.wait(step)
