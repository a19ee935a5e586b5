"""The burst benchmark's observer: a subscriber speaking the NATS protocol on a raw socket.

Child process (not run by hand): `python bench/_rawsub.py '<json>'`, JSON keys `url`,
`subject` (e.g. `burst.ser1.>`), `records` (a file to write), optional `period_ms` (the
schedule's period: the server's message schedules stamp the *next* slot, see `slot_of`).

Why not nats-py: receiving 100,000 messages in a burst costs nats-py about 1 s of Python
per 100k in its own parsing and callbacks, so its receive times would tell when nats-py
got round to a message, not when it arrived; that would blur exactly what the burst
benchmark measures. This process does as little as possible between two reads of its
socket: `recv` into a new chunk, stamp it with `time.time()`, keep it. Parsing runs only
once the socket has had nothing to read for 5 ms, in slices of ~2 ms with a read
between, so a herd is read first and parsed in its gaps or after it (a slice may overrun
by one 16 KB piece, or by the scheduler preempting this process: the longest slice is
reported). The end of a herd is therefore seen after the parse of it (~0.3-0.6 s per
100,000 messages), the arrival times are not affected.
Every message is stamped with the time of the read that delivered its last byte.

Protocol: reads INFO, sends `CONNECT {"verbose":false,"pedantic":false,"headers":true,
"no_responders":true}`, `SUB <subject> 1` and `PING`; on the PONG it is subscribed and
prints `{"event": "ready"}`. Then, on stdin, one command a line:
- `expect <slot_ms> <n>`: print `{"event": "complete", ...}` once n distinct subjects
  have arrived for that slot;
- `stop` (or stdin closed, SIGTERM, SIGINT): read what is still waiting, parse the rest,
  write the records and print `{"event": "result", ...}` (counts, and the observer's own
  limits: reads, the largest read, reads that filled the buffer, the longest parse slice).
PINGs of the server are answered with PONG. The records file has one line per message:
`<subject> <slot_ms or -> <arrival>`.

`Parser` is the protocol parser alone (tests/test_bench_rawsub.py feeds it nats-py
publishes split across reads at every place); `RawSubscriber` is the parent's handle on
this child.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

READ_SIZE = 1 << 20  # bytes per recv; a read that fills it means a backlog was waiting
RCVBUF = 16 << 20
PARSE_SLICE_S = 0.002  # parse this long at most before looking at the socket again
QUIET_S = 0.005  # parse only after the socket had nothing for this long
PARSE_PIECE = 16 << 10  # bytes parsed at a time (the slice's budget is checked between)
CONNECT = (
    b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,'
    b'"name":"burst-observer","lang":"python-raw","version":"0"}\r\n'
)

# Header names whose value gives a message's slot (see Parser.slot_of).
_NEXT = b"\r\nNats-Schedule-Next:"
_MSG_ID = b"\r\nNats-Msg-Id:"
_SCHEDULED = b"\r\nNats-Cron-Scheduled:"

Record = tuple[bytes, int | None, float]  # subject, slot (unix ms) or None, arrival


def _rfc3339_ms(text: bytes) -> int:
    """`2026-12-02T10:00:20Z` / `...20.000Z` / `...+00:00` as unix milliseconds."""
    return round(datetime.fromisoformat(text.decode()).timestamp() * 1000)


class Parser:
    """Incremental parser of what a NATS server sends a client.

    `feed(data, t)` takes the bytes of one read and its time; complete MSG and HMSG
    messages become `records` (subject, slot, t), where t is the time of the read that
    completed the message; a partial message waits for the next read. PINGs are counted
    in `pings` (the caller answers them), PONGs in `pongs`, `-ERR` lines kept in `errors`.
    """

    def __init__(self, period_ms: int = 0) -> None:
        self.period_ms = period_ms
        self.records: list[Record] = []
        self.pings = 0
        self.pongs = 0
        self.info: dict[str, Any] | None = None
        self.errors: list[str] = []
        self.seen: set[tuple[bytes, int | None]] = set()
        self.distinct: Counter[int | None] = Counter()  # distinct subjects per slot
        self._buf = bytearray()
        self.last_new: dict[int | None, float] = {}  # per slot: arrival of its latest subject
        self._times: dict[bytes, int] = {}

    def feed(self, data: bytes, t: float) -> None:
        buf = self._buf
        buf += data
        end = len(buf)
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            if buf.startswith(b"HMSG ", pos):
                args = bytes(buf[pos + 5 : eol]).split()
                # subject sid [reply-to] header-bytes total-bytes
                hlen, total = int(args[-2]), int(args[-1])
                stop = eol + 2 + total + 2
                if stop > end:
                    break
                slot = self.slot_of(bytes(buf[eol + 2 : eol + 2 + hlen]))
                self._record(args[0], slot, t)
                pos = stop
            elif buf.startswith(b"MSG ", pos):
                args = bytes(buf[pos + 4 : eol]).split()
                stop = eol + 2 + int(args[-1]) + 2
                if stop > end:
                    break
                self._record(args[0], None, t)
                pos = stop
            else:
                line = bytes(buf[pos:eol])
                pos = eol + 2
                if line == b"PING":
                    self.pings += 1
                elif line == b"PONG":
                    self.pongs += 1
                elif line.startswith(b"INFO "):
                    self.info = json.loads(line[5:])
                elif line.startswith(b"-ERR"):
                    self.errors.append(line.decode(errors="replace"))
                elif line != b"+OK":
                    self.errors.append(f"unexpected: {line[:80]!r}")
        del buf[:pos]

    def _record(self, subject: bytes, slot: int | None, t: float) -> None:
        self.records.append((subject, slot, t))
        key = (subject, slot)
        if key not in self.seen:
            self.seen.add(key)
            self.distinct[slot] += 1
            self.last_new[slot] = t

    def slot_of(self, header: bytes) -> int | None:
        """The slot (unix ms) a fire was produced for, from its header block.

        - nats-server message schedules: `Nats-Schedule-Next` is the schedule's next slot
          (second resolution), so the slot is that minus the period;
        - nats-cron and the APScheduler baseline: `Nats-Msg-Id` is `<subject>:<slot ms>`;
          else `Nats-Cron-Scheduled` (RFC 3339).
        """
        for name in (_NEXT, _MSG_ID, _SCHEDULED):
            at = header.find(name)
            if at < 0:
                continue
            value = header[at + len(name) : header.find(b"\r\n", at + 2)].strip()
            if name is _MSG_ID:
                tail = value.rpartition(b":")[2]
                if tail.isdigit():
                    return int(tail)
                continue
            ms = self._times.get(value)  # a herd repeats one time: parse it once
            if ms is None:
                try:
                    ms = _rfc3339_ms(value)
                except ValueError:
                    continue
                self._times[value] = ms
            return ms - self.period_ms if name is _NEXT else ms
        return None


# --- the child process -------------------------------------------------------------------------


def _out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _cpu_s() -> float:
    t = os.times()
    return round(t.user + t.system, 3)


def main(cfg: dict[str, Any]) -> None:
    url = urlparse(cfg["url"])
    parser = Parser(int(cfg.get("period_ms", 0)))
    stopping: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # before connect: window
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(10)
    sock.connect((url.hostname or "127.0.0.1", url.port or 4222))
    chunks: list[tuple[float, bytes] | None] = []
    reads = full_reads = max_read = total_bytes = 0

    # Handshake, blocking: INFO, then CONNECT + SUB + PING, subscribed once the PONG came.
    while parser.info is None:
        data = sock.recv(READ_SIZE)
        if not data:
            raise ConnectionError("closed before INFO")
        parser.feed(data, time.time())
    sock.sendall(CONNECT + f"SUB {cfg['subject']} 1\r\nPING\r\n".encode())
    while parser.pongs == 0:
        data = sock.recv(READ_SIZE)
        if not data:
            raise ConnectionError(f"closed during the handshake: {parser.errors}")
        parser.feed(data, time.time())
    if parser.errors:
        raise ConnectionError(f"server refused: {parser.errors}")
    _out({"event": "ready", "pid": os.getpid(), "server": (parser.info or {}).get("version")})

    sock.setblocking(False)
    stdin = sys.stdin.fileno()
    os.set_blocking(stdin, False)
    pending_in = b""
    expect: tuple[int, int] | None = None
    completed = False
    answered = parser.pings
    parsed = 0
    closed = False

    quiet = False
    offset = 0  # into chunks[parsed]: a large read is parsed in pieces
    longest_slice = 0.0

    def parse_some(budget: float | None) -> None:
        nonlocal parsed, answered, offset, longest_slice
        started = time.perf_counter()
        deadline = started + budget if budget is not None else None
        while parsed < len(chunks):
            item = chunks[parsed]
            assert item is not None
            t, data = item
            piece = data[offset : offset + PARSE_PIECE]
            parser.feed(piece, t)
            offset += len(piece)
            if offset >= len(data):
                chunks[parsed] = None  # parsed: free it
                parsed += 1
                offset = 0
            if deadline is not None and time.perf_counter() > deadline:
                break
        if budget is not None:
            longest_slice = max(longest_slice, time.perf_counter() - started)
        if parser.pings > answered:
            with contextlib.suppress(OSError):
                sock.sendall(b"PONG\r\n" * (parser.pings - answered))
            answered = parser.pings

    while not stopping and not closed:
        # 1. Read whatever is waiting, stamping each read; nothing else between reads.
        try:
            data = sock.recv(READ_SIZE)
        except BlockingIOError:
            data = None
        except OSError as exc:
            parser.errors.append(f"socket: {exc}")
            break
        if data is not None:
            if not data:
                parser.errors.append("server closed the connection")
                break
            quiet = False
            chunks.append((time.time(), data))
            reads += 1
            size = len(data)
            total_bytes += size
            max_read = max(max_read, size)
            full_reads += size == READ_SIZE
            continue
        # 2. Nothing to read: once the socket has been quiet for a moment (not while a
        #    herd streams in), parse a slice of what was read.
        if parsed < len(chunks):
            if not quiet:
                if select.select([sock], [], [], QUIET_S)[0]:
                    continue
                quiet = True
            parse_some(PARSE_SLICE_S)
            if expect is not None and not completed and parser.distinct[expect[0]] >= expect[1]:
                completed = True
                last = parser.last_new.get(expect[0])
                _out({"event": "complete", "last_arrival": last, "at": time.time()})
            continue
        # 3. All parsed: wait for the socket or a command.
        ready, _, _ = select.select([sock, stdin], [], [], 0.1)
        if stdin in ready:
            try:
                got = os.read(stdin, 4096)
            except BlockingIOError:
                got = b"?"
            if not got:
                stopping.append("stdin closed")
            pending_in += got
            while b"\n" in pending_in:
                line, pending_in = pending_in.split(b"\n", 1)
                words = line.split()
                if words[:1] == [b"expect"]:
                    expect = (int(words[1]), int(words[2]))
                    completed = False
                    if parser.distinct[expect[0]] >= expect[1]:  # already there
                        completed = True
                        last = parser.last_new.get(expect[0])
                        _out({"event": "complete", "last_arrival": last, "at": time.time()})
                elif words[:1] == [b"stop"]:
                    stopping.append("stop")

    # Stop: take what is still waiting (without waiting for more), parse everything.
    with contextlib.suppress(OSError):
        while data := sock.recv(READ_SIZE):
            chunks.append((time.time(), data))
            reads += 1
            total_bytes += len(data)
    parse_some(None)
    with contextlib.suppress(OSError):
        sock.close()
    path = Path(cfg["records"])
    with path.open("w") as f:
        for subject, slot, t in parser.records:
            f.write(f"{subject.decode()} {'-' if slot is None else slot} {t:.6f}\n")
    _out(
        {
            "event": "result",
            "messages": len(parser.records),
            "bytes": total_bytes,
            "reads": reads,
            "max_read_bytes": max_read,
            "full_reads": full_reads,
            # The longest the socket went unread for parsing (stamps late by up to this):
            "longest_parse_slice_s": round(longest_slice, 4),
            "pings_answered": answered,
            "errors": parser.errors[:5],
            "cpu_s": _cpu_s(),
            "stopped_by": stopping[0] if stopping else "connection",
            "records": str(path),
        }
    )


# --- the parent's handle -----------------------------------------------------------------------


def read_records(path: str | Path) -> list[tuple[str, int | None, float]]:
    """The (subject, slot ms or None, arrival) triples written by the child."""
    out: list[tuple[str, int | None, float]] = []
    with open(path) as f:
        for line in f:
            subject, slot, t = line.split()
            out.append((subject, None if slot == "-" else int(slot), float(t)))
    return out


class RawSubscriber:
    """The parent's handle on one observer child (asyncio).

    `start()` returns once the child is subscribed; `expect(slot_ms, n)` then
    `wait_complete(timeout)`; `stop()` returns the child's result with its `records`.
    `register(proc)`/`unregister(proc)` (e.g. the benchmark's process list) make sure
    the child is stopped whatever happens.
    """

    def __init__(
        self,
        url: str,
        subject: str,
        records: Path,
        period_ms: int = 0,
        register: Callable[[Any], Any] | None = None,
        unregister: Callable[[Any], Any] | None = None,
    ) -> None:
        self.config = {
            "url": url,
            "subject": subject,
            "records": str(records),
            "period_ms": period_ms,
        }
        self.records_path = records
        self.proc: Any = None
        self.pid: int | None = None
        self._register = register
        self._unregister = unregister
        self._stderr = bytearray()
        self._drain: Any = None
        self.complete: dict[str, Any] | None = None

    async def start(self, timeout: float = 15.0) -> None:
        import asyncio

        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).resolve()),
            json.dumps(self.config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        if self._register is not None:
            self._register(self.proc)
        self._drain = asyncio.get_running_loop().create_task(self._read_stderr())
        ready = await self._line(timeout)
        self.pid = int(ready["pid"])

    async def _read_stderr(self) -> None:
        while chunk := await self.proc.stderr.read(65536):
            self._stderr += chunk
            del self._stderr[:-20000]

    async def _line(self, timeout: float) -> dict[str, Any]:
        import asyncio

        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            await asyncio.sleep(0.2)
            raise RuntimeError(f"observer ended: {self._stderr.decode()[-2000:]}")
        return dict(json.loads(line))

    async def send(self, command: str) -> None:
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def expect(self, slot_ms: int, n: int) -> None:
        await self.send(f"expect {slot_ms} {n}")

    async def wait_complete(self, timeout: float) -> dict[str, Any] | None:
        """The `complete` event, or None if it did not come within `timeout` seconds."""
        try:
            self.complete = await self._line(max(0.0, timeout))
        except TimeoutError:
            return None
        return self.complete

    async def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        import asyncio

        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send("stop")
            self.proc.stdin.close()
        while True:  # skip a late `complete`
            result = await self._line(timeout)
            if result.get("event") == "result":
                break
        await asyncio.wait_for(self.proc.wait(), 10)
        result["records"] = read_records(self.records_path)
        await self.close()
        return result

    async def close(self) -> None:
        import asyncio

        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), 10)
        if self._unregister is not None:
            with contextlib.suppress(ValueError):
                self._unregister(self.proc)
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain, 5)
        with contextlib.suppress(OSError):
            self.records_path.unlink()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
