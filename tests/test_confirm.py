"""Publish confirmation against a real nats-server, and what an unconfirmed fire does."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import nats
from nats.aio.client import Client

from nats_apscheduler.confirm import Confirmer
from nats_apscheduler.embedded import EmbeddedNatsServer
from nats_apscheduler.fire import Firer
from tests.test_fire import SLOT, Fence, doc, make_job, subscribe


async def test_confirm_after_publishes_and_shared_markers(nc: Client, bucket: str) -> None:
    confirmer = Confirmer(nc)
    await confirmer.start()
    try:
        sub = await subscribe(nc, f"{bucket}.x")
        for i in range(50):
            await nc.publish(f"{bucket}.x", str(i).encode())
        # Confirmations asked for in one loop turn: the first marker goes out at once, the
        # others share a second one.
        results = await asyncio.gather(*(confirmer.confirm() for _ in range(20)))
        assert results == [True] * 20
        assert confirmer._seq == 2
        # The server processed all 50 before the marker; they are on their way to us.
        assert [int((await sub.next_msg(timeout=2)).data) for _ in range(50)] == list(range(50))
        assert await confirmer.confirm()
        assert confirmer._seq == 3
    finally:
        await confirmer.stop()


async def test_the_first_marker_of_a_turn_leaves_with_the_publish(nc: Client, bucket: str) -> None:
    """A fire at a time: its marker is published in the same loop turn as the fire, so
    both go out in one socket write (nats-py's flusher runs on the next turn)."""
    confirmer = Confirmer(nc)
    await confirmer.start()
    try:
        await asyncio.sleep(0)
        before = nc.stats["out_msgs"]
        await nc.publish(f"{bucket}.y", b"fire")
        pending = asyncio.ensure_future(confirmer.confirm())
        await asyncio.sleep(0)  # one turn: the task ran up to its wait for the marker
        assert nc.stats["out_msgs"] == before + 2
        assert await pending
    finally:
        await confirmer.stop()


async def test_a_lost_connection_fails_pending_confirmations_at_once(nc: Client) -> None:
    confirmer = Confirmer(nc, timeout=30)
    await confirmer.start()
    try:
        pending = asyncio.ensure_future(confirmer.confirm())
        await asyncio.sleep(0)  # confirm() registered its wait; the marker is not back
        confirmer.connection_lost()
        assert await asyncio.wait_for(pending, 1) is False
        assert await confirmer.confirm()  # later confirmations work again
    finally:
        await confirmer.stop()


async def test_no_confirmation_once_the_server_is_gone(fresh_server: EmbeddedNatsServer) -> None:
    client = await nats.connect(fresh_server.url, max_reconnect_attempts=-1)
    confirmer = Confirmer(client, timeout=1)
    await confirmer.start()
    try:
        assert await confirmer.confirm()
        fresh_server.stop()
        await client.publish("gone.x", b"lost?")
        assert await confirmer.confirm() is False
    finally:
        await confirmer.stop()
        await client.close()


async def test_unconfirmed_fire_hands_its_slot_back(nc: Client, bucket: str) -> None:
    persisted: list[object] = []

    async def never() -> bool:
        return False

    firer = Firer(
        nc, "inst-1", fence=Fence(), epoch=lambda: 7, persist=persisted.append, confirm=never
    )
    job = make_job(doc(f"{bucket}.u"), next_run_time=SLOT + timedelta(minutes=1))
    outcome = await firer.fire(job, SLOT)
    assert outcome.status == "unconfirmed"
    assert job.next_run_time == SLOT  # the next leader (or this one, re-elected) fires it
    assert job.kwargs["state"] == {}  # not recorded as run
    assert persisted == [job]
