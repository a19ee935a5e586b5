"""Protocol bytes written to a nats-py connection's socket at once: the fire path's outlet.

nats-py's `publish()` only appends to the client's pending buffer; its flusher task writes
the buffer on a later turn of the loop. For a fire that gap matters twice:
- a leader checks its fence, publishes, and is frozen (SIGSTOP, a long GC) before the
  flusher runs: after it thaws, the old fire goes out behind the new leader's fires. A
  `Wire.write()` right after the fence check, with no await in between, leaves the
  window only between two adjacent statements;
- nats-py keeps its pending buffer across a reconnect and sends it on the new connection,
  so a fire or a progress mark queued before a disconnect could reach the server after a
  new leader took over. Bytes written here go to the current socket or are lost with it.
Writing the client's pending buffer first keeps the connection's order: everything
published before still goes out before these bytes.

Headers and commands are built here too (`hpub`), once per message, without nats-py's
per-call validation: subjects and header values come from validated job documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from nats.aio.client import Client

_CRLF = b"\r\n"
_HEADER_LINE = b"NATS/1.0\r\n"


def headers(pairs: Iterable[tuple[str, str]]) -> bytes:
    """A NATS header block (values must not contain CR or LF)."""
    return _HEADER_LINE + b"".join(f"{k}: {v}\r\n".encode() for k, v in pairs) + _CRLF


def hpub(subject: str, reply: str, header: bytes, payload: bytes) -> bytes:
    """An HPUB command: a message with headers."""
    size = len(header)
    return (
        f"HPUB {subject} {reply} {size} {size + len(payload)}\r\n".encode()
        + header
        + payload
        + _CRLF
    )


def pub(subject: str, payload: bytes) -> bytes:
    """A PUB command without headers or reply."""
    return f"PUB {subject} {len(payload)}\r\n".encode() + payload + _CRLF


class Wire:
    """The write-through outlet of one connection."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._lost = 0  # disconnects signalled by the owner (see connection_lost)

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    def generation(self) -> int:
        """Changes whenever the connection did: bytes written under one generation share one
        TCP stream, so the server processes them in order or the later ones not at all."""
        return int(self._nc.stats.get("reconnects", 0)) + self._lost

    def connection_lost(self) -> None:
        """Call from the disconnected callback (nats-py counts the reconnect only later)."""
        self._lost += 1

    def write(self, commands: Sequence[bytes], messages: int = 0) -> None:
        """Write `commands` to the socket now, after whatever nats-py had queued.

        Raises ConnectionError when not connected (nothing is written)."""
        nc = self._nc
        transport = nc._transport
        if not nc.is_connected or transport is None:
            raise ConnectionError("not connected to NATS")
        if nc._pending:
            commands = [*nc._pending, *commands]
            nc._pending = []
            nc._pending_data_size = 0
        transport.writelines(list(commands))
        stats = nc.stats
        stats["out_msgs"] += messages
        stats["out_bytes"] += sum(len(c) for c in commands)

    def max_payload(self) -> int:
        """The server's limit on one message (headers and body); 0 if not known yet."""
        return int(self._nc._max_payload or 0)

    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel (back-pressure)."""
        transport = self._nc._transport
        writer = getattr(transport, "_io_writer", None)
        if writer is None:
            return 0
        return int(writer.transport.get_write_buffer_size())
