"""Pipelined compare-and-set KV writes (`KVWrites`) against a real nats-server."""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import KeyValueConfig

from nats_apscheduler._kvwrite import KVWrites


async def _bucket(nc: Client, name: str):  # type: ignore[no-untyped-def]
    return await nc.jetstream().create_key_value(KeyValueConfig(bucket=name))


async def test_a_batch_gets_one_outcome_per_write_in_order(nc: Client, bucket: str) -> None:
    kv = await _bucket(nc, bucket)
    writes = KVWrites(nc, bucket)
    await writes.start()
    try:
        created = await writes.send([(f"k{i}", f"v{i}".encode(), 0) for i in range(200)])
        assert all(isinstance(r, int) for r in created)
        assert created == sorted(created) and len(set(created)) == 200
        assert (await kv.get("k7")).value == b"v7"
        assert (await kv.get("k7")).revision == created[7]

        first, second = created[0], created[1]
        outcomes = await writes.send(
            [
                ("k0", b"new", first),  # right revision
                ("k1", b"new", first),  # wrong revision: the compare-and-set fails
                ("k2", None, created[2]),  # delete
                ("k3", b"new", 0),  # a create of a key that exists
            ]
        )
        assert isinstance(outcomes[0], int) and outcomes[0] > created[-1]
        assert isinstance(outcomes[1], nats.js.errors.KeyWrongLastSequenceError)
        assert isinstance(outcomes[2], int)
        assert isinstance(outcomes[3], nats.js.errors.KeyWrongLastSequenceError)
        assert (await kv.get("k0")).value == b"new"
        assert (await kv.get("k1")).revision == second
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get("k2")
        # A create over the deletion marker must name the marker's revision.
        outcome = (await writes.send([("k2", b"back", 0)]))[0]
        assert isinstance(outcome, nats.js.errors.KeyWrongLastSequenceError)
        assert isinstance((await writes.send([("k2", b"back", outcomes[2])]))[0], int)
        assert (await kv.get("k2")).value == b"back"
    finally:
        await writes.stop()


async def test_no_stream_is_a_transport_error_not_a_conflict(nc: Client, bucket: str) -> None:
    writes = KVWrites(nc, bucket)  # the bucket does not exist: nobody answers
    await writes.start()
    try:
        outcome = (await writes.send([("k", b"v", 0)]))[0]
        assert isinstance(outcome, nats.js.errors.NoStreamResponseError)
        assert not isinstance(outcome, nats.js.errors.APIError)
    finally:
        await writes.stop()


async def test_a_write_nobody_acknowledges_times_out(nc: Client, bucket: str) -> None:
    # A core subscriber on the bucket's subjects takes the publish and never replies.
    silent = await nc.subscribe(f"$KV.{bucket}.>")
    writes = KVWrites(nc, bucket, timeout=0.3)
    await writes.start()
    try:
        outcomes = await asyncio.wait_for(writes.send([("a", b"1", 0), ("b", b"2", 0)]), 5)
        assert all(isinstance(o, nats.errors.TimeoutError) for o in outcomes)
        assert (await silent.next_msg(timeout=2)).subject == f"$KV.{bucket}.a"
        assert not writes._pending  # nothing left waiting for a reply
    finally:
        await writes.stop()
        await silent.unsubscribe()


async def test_writes_on_a_closed_connection_fail_at_once(nats_url: str, bucket: str) -> None:
    client = await nats.connect(nats_url)
    await _bucket(client, bucket)
    writes = KVWrites(client, bucket)
    await writes.start()
    await client.close()
    outcomes = await asyncio.wait_for(writes.send([("a", b"1", 0), ("b", b"2", 0)]), 5)
    assert all(isinstance(o, nats.errors.ConnectionClosedError) for o in outcomes)
    await writes.stop()
