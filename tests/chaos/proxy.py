"""Loopback TCP proxies owned by the chaos harness: one group per nats-cron instance.

Each instance reaches every NATS node through its own listener, so the harness can cut
one instance off (drop its connections, refuse new ones for a while) without touching
the others, and can tell which node an instance is connected to. The proxies run on an
event loop of their own, in a daemon thread, so the harness's own work never stalls them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
_CHUNK = 64 * 1024
_CONNECT_TIMEOUT = 2.0


@dataclass(eq=False)
class _Conn:
    node: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter

    def abort(self) -> None:
        # An abort sends RST: the client sees the connection die at once, as on a cable cut.
        for writer in (self.client, self.upstream):
            with contextlib.suppress(Exception):
                writer.transport.abort()


@dataclass(eq=False)
class _Group:
    name: str
    upstreams: list[int]
    servers: list[asyncio.Server] = field(default_factory=list)
    conns: set[_Conn] = field(default_factory=set)
    refuse_until: float = 0.0  # monotonic
    accepted: int = 0
    refused: int = 0


class ProxyHub:
    """All proxy groups of one chaos run. Use as a context manager or call `close()`."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._groups: dict[str, _Group] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="chaos-proxies", daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("the proxy thread did not start")

    def __enter__(self) -> ProxyHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- public, called from the harness's thread ----------------------------------------

    async def add_group(self, name: str, upstream_ports: list[int]) -> list[int]:
        """Listen for `name` in front of each upstream port; returns the listening ports."""
        return await self._run(self._add_group(name, upstream_ports))

    async def cut(self, name: str, seconds: float) -> int:
        """Drop every connection of `name` and refuse new ones for `seconds`."""
        return await self._run(self._cut(name, seconds))

    def nodes_in_use(self, name: str) -> set[int]:
        """Indexes (into the upstream list) of the nodes `name` is connected to now."""
        group = self._groups[name]
        return {conn.node for conn in list(group.conns)}

    def stats(self, name: str) -> dict[str, int]:
        group = self._groups[name]
        return {"accepted": group.accepted, "refused": group.refused, "open": len(group.conns)}

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # --- the proxy loop ----------------------------------------------------------------------

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        try:
            self._loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    async def _add_group(self, name: str, upstream_ports: list[int]) -> list[int]:
        group = _Group(name, list(upstream_ports))
        ports = []
        for node, upstream in enumerate(upstream_ports):

            async def handle(
                reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter,
                node: int = node,
                upstream: int = upstream,
            ) -> None:
                await self._handle(group, node, upstream, reader, writer)

            server = await asyncio.start_server(handle, self.host, 0)
            group.servers.append(server)
            ports.append(server.sockets[0].getsockname()[1])
        self._groups[name] = group
        return ports

    async def _handle(
        self,
        group: _Group,
        node: int,
        upstream: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if time.monotonic() < group.refuse_until:
            group.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, upstream), _CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            writer.transport.abort()  # the node is down: the client tries another
            return
        if time.monotonic() < group.refuse_until:  # a cut began while we connected
            group.refused += 1
            writer.transport.abort()
            up_writer.transport.abort()
            return
        conn = _Conn(node, writer, up_writer)
        group.conns.add(conn)
        group.accepted += 1
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            group.conns.discard(conn)
            conn.abort()

    async def _cut(self, name: str, seconds: float) -> int:
        group = self._groups[name]
        group.refuse_until = time.monotonic() + seconds
        conns = list(group.conns)
        for conn in conns:
            conn.abort()
        return len(conns)

    async def _close(self) -> None:
        for group in self._groups.values():
            for server in group.servers:
                server.close()
            for conn in list(group.conns):
                conn.abort()
        for group in self._groups.values():
            for server in group.servers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 2)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or an error; then the other direction is torn down too."""
    try:
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()  # back-pressure: a frozen (SIGSTOPped) reader stalls us
    except (OSError, ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.transport.abort()
