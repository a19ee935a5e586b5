"""The one place where synchronous code calls into an asyncio event loop.

A `LoopBridge` wraps a loop, either one it runs itself on a private daemon thread or
one it is given (the loop of a NATS connection the application owns). `call()` blocks
the calling thread until a coroutine finishes on the loop; called on the loop's own
thread it would deadlock, so it raises `BridgeError` at once instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from nats_apscheduler.errors import BridgeError

T = TypeVar("T")


class LoopBridge:
    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread | None = None):
        self.loop = loop
        self._thread = thread

    @classmethod
    def on_new_thread(cls, name: str) -> LoopBridge:
        """Start a private event loop on a daemon thread."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        ready.wait()
        return cls(loop, thread)

    @property
    def owns_loop(self) -> bool:
        return self._thread is not None

    def in_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def call(self, coro: Coroutine[Any, Any, T], timeout: float, what: str = "this call") -> T:
        """Run `coro` on the loop and wait for it; BridgeError on the loop's own thread."""
        if self.in_loop_thread():
            coro.close()
            raise BridgeError(
                f"{what} would block the event loop it needs; use the async variant "
                f"(await it) when the store shares the application's loop"
            )
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def soon(self, fn: Callable[..., object], *args: object) -> None:
        """Schedule `fn(*args)` on the loop from any thread, without waiting."""
        if self.in_loop_thread():
            fn(*args)
        elif not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        """Stop and close a loop this bridge started; a given loop is left alone."""
        if self._thread is None or self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()
