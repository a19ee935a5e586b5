"""The burst benchmark's raw-socket observer (bench/_rawsub.py): its parser against what a
real nats-server sends for nats-py publishes, split across reads at every place, and the
child process end to end (subscribe, complete, PING/PONG, records)."""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from nats_apscheduler.embedded import EmbeddedNatsServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _rawsub import CONNECT, Parser, RawSubscriber

SLOT = 1_796_205_620_000  # 2026-12-02T10:00:20Z in unix ms
PERIOD = 20_000


def _expected(
    prefix: str,
) -> list[tuple[str, dict[str, str] | None, bytes, str | None, int | None]]:
    """(subject, headers, payload, reply, slot) of the messages published."""
    big = bytes(range(256)) * 4  # 1 KB, every byte value, CR and LF included
    return [
        (f"{prefix}.plain", None, b"", None, None),
        (f"{prefix}.tricky", None, b"\r\nMSG x 1 3\r\nabc\r\nHMSG y 1 2 2\r\n\r\n", None, None),
        (f"{prefix}.reply", None, b"hi", "_INBOX.abc", None),
        (
            f"{prefix}.1",
            {"Nats-Msg-Id": f"{prefix}.1:{SLOT}", "Nats-Cron-Job": f"{prefix}.1"},
            b"",
            None,
            SLOT,
        ),
        (
            f"{prefix}.2",
            {"Nats-Cron-Scheduled": "2026-12-02T10:00:20.000Z", "X": "a: b"},
            big,
            None,
            SLOT,
        ),
        (
            f"{prefix}.3",
            {"Nats-Msg-Id": "not-a-slot", "Nats-Cron-Scheduled": "2026-12-02T10:00:20Z"},
            b"x",
            "reply.to",
            SLOT,
        ),
        (f"{prefix}.4", {"Nats-Schedule-Next": "2026-12-02T10:00:40Z"}, b"", None, SLOT),
        (f"{prefix}.5", {"Other": "1"}, b"payload", None, None),
    ]


async def _raw_capture(url: str, nc: Client, prefix: str) -> bytes:
    """Everything the server sends a raw subscriber of `<prefix>.>` while nats-py publishes
    the expected messages, from INFO to the PONG after the last message."""
    host, port = url.removeprefix("nats://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    stream = bytearray()
    try:
        sock.sendall(CONNECT + f"SUB {prefix}.> 1\r\nPING\r\n".encode())
        while stream.count(b"PONG\r\n") < 1:
            stream += sock.recv(65536)
        for subject, headers, payload, reply, _slot in _expected(prefix):
            await nc.publish(subject, payload, reply=reply or "", headers=headers)
        # nats-py's flush() writes its PING straight to the socket, ahead of publishes still
        # queued for its flusher task; the first flush has the flusher write them (before
        # its PONG can be read), so the second one's PONG follows every publish.
        await nc.flush()
        await nc.flush()
        sock.sendall(b"PING\r\n")
        while stream.count(b"PONG\r\n") < 2:
            stream += await asyncio.to_thread(sock.recv, 65536)
    finally:
        sock.close()
    return bytes(stream)


def _parse(parts: list[bytes]) -> Parser:
    parser = Parser(period_ms=PERIOD)
    for i, part in enumerate(parts):
        parser.feed(part, float(i))
    return parser


async def test_parser_against_real_server_bytes_split_everywhere(nc: Client, nats_url: str) -> None:
    prefix = "rawsub.t1"
    stream = await _raw_capture(nats_url, nc, prefix)
    expected = [(s.encode(), slot) for s, _h, _p, _r, slot in _expected(prefix)]

    whole = _parse([stream])
    assert [(s, slot) for s, slot, _t in whole.records] == expected
    assert whole.info is not None and whole.pongs == 2 and whole.errors == []
    assert whole.distinct[SLOT] == 4

    # Where each message ends in the stream (the parser stamps it with that read's time).
    ends = []
    for cut in range(len(stream) + 1):
        if len(_parse([stream[:cut]]).records) > len(ends):
            ends.append(cut)
    assert len(ends) == len(expected)

    for cut in range(len(stream) + 1):  # two reads, split at every byte
        parser = _parse([stream[:cut], stream[cut:]])
        assert [(s, slot) for s, slot, _t in parser.records] == expected, cut
        assert [t for _s, _slot, t in parser.records] == [0.0 if e <= cut else 1.0 for e in ends]
        assert parser.pongs == 2 and parser.errors == []

    rng = random.Random(7)
    for _ in range(200):  # many reads at random places
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(2, 40)))
        parts = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert [(s, slot) for s, slot, _t in _parse(parts).records] == expected

    one_by_one = _parse([stream[i : i + 1] for i in range(len(stream))])
    assert [(s, slot) for s, slot, _t in one_by_one.records] == expected


async def test_parser_counts_pings_and_errors() -> None:
    parser = Parser()
    parser.feed(b"PI", 0.0)
    parser.feed(b"NG\r\n+OK\r\nPING\r\n-ERR 'Slow Consumer'\r\nMSG a 1 0\r\n\r\n", 1.0)
    assert parser.pings == 2
    assert parser.errors == ["-ERR 'Slow Consumer'"]
    assert parser.records == [(b"a", None, 1.0)]


@pytest.fixture
def pinging_server(tmp_path: Path) -> EmbeddedNatsServer:
    """A server that PINGs its clients every 100 ms and drops one after 2 missed PONGs."""
    conf = tmp_path / "ping.conf"
    conf.write_text('ping_interval: "100ms"\nping_max: 2\n')
    server = EmbeddedNatsServer(tmp_path / "js", config_file=conf).start()
    yield server
    server.stop()


async def test_observer_child_end_to_end(
    pinging_server: EmbeddedNatsServer, tmp_path: Path
) -> None:
    url = pinging_server.url
    sub = RawSubscriber(url, "burst.e2e.>", tmp_path / "records.txt", period_ms=PERIOD)
    nc = await nats.connect(url)
    try:
        await sub.start()
        await asyncio.sleep(1.0)  # ~10 server PINGs: unanswered, the server would drop it
        await sub.expect(SLOT, 300)
        before = time.time()
        for i in range(300):
            await nc.publish(
                f"burst.e2e.{i}", b"", headers={"Nats-Msg-Id": f"burst.e2e.{i}:{SLOT}"}
            )
            if i == 0:  # a duplicate and a message of no slot, before the herd completes
                headers = {"Nats-Msg-Id": f"burst.e2e.0:{SLOT}"}
                await nc.publish("burst.e2e.0", b"", headers=headers)
                await nc.publish("burst.e2e.x", b"no headers")
        # One connection's messages reach a subscriber in order: once the 300th distinct
        # subject is in, so are the two before it.
        await nc.flush()
        complete = await sub.wait_complete(10)
        assert complete is not None and complete["event"] == "complete"
        assert complete["last_arrival"] >= before
        result = await sub.stop()
    finally:
        await sub.close()
        await nc.close()
    records = result["records"]
    assert result["errors"] == [] and result["pings_answered"] >= 5
    assert result["messages"] == len(records) == 302
    assert len({s for s, slot, _t in records if slot == SLOT}) == 300
    assert sum(1 for s, _slot, _t in records if s == "burst.e2e.0") == 2
    assert ("burst.e2e.x", None) in {(s, slot) for s, slot, _t in records}
    assert all(before <= t <= time.time() for _s, _slot, t in records)
    assert not (tmp_path / "records.txt").exists()  # read and removed
