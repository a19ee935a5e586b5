"""An example worker for `jetstream` jobs: a stream stores each fire, a durable consumer hands
it to the workers, each acknowledges what it did. Exactly once per slot.

A job with `"delivery": {"mode": "jetstream"}` publishes each fire to JetStream and waits for
the stream's acknowledgement: `stored` (with stream and sequence) or `failed` (no stream
captures the subject, an error, no ack in time). Every fire of one slot carries the same
`Nats-Msg-Id` (`<subject>:<scheduled unix ms>`), also a fire repeated after a failover and
every retry attempt, so the stream's duplicate window keeps one copy: the stream holds each
slot once, and a work-queue consumer hands it to one worker, which acknowledges it once done.

This worker creates the stream if it does not exist (work-queue retention, a 2-minute
duplicate window), then fetches and acknowledges, writing one JSON line per message.

Needs only nats-py (`pip install nats-py`). Configuration from the environment:

    NATS_URL        server URL(s), comma-separated (default nats://localhost:4222)
    NATS_CREDS      credentials file; or NATS_USER + NATS_PASSWORD; or NATS_TOKEN
    WORKER_SUBJECT  the jobs' subjects, wildcards allowed (default demo.stored.>)
    WORKER_STREAM   the stream (default CRON_WORK)
    WORKER_DURABLE  the durable consumer shared by the workers (default workers)

    python deploy/examples/jetstream_worker.py
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js.api import RetentionPolicy, StreamConfig

DUPLICATE_WINDOW = 120.0  # seconds: longer than any failover or retry of one slot


def log(msg: str, **fields: Any) -> None:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "msg": msg, **fields}
    print(json.dumps(record), flush=True)


def connect_options() -> dict[str, Any]:
    env = os.environ
    servers = [s.strip() for s in env.get("NATS_URL", "nats://localhost:4222").split(",")]
    options: dict[str, Any] = {
        "servers": [s for s in servers if s],
        "name": "nats-cron-example-jetstream-worker",
        "max_reconnect_attempts": -1,
    }
    if env.get("NATS_CREDS"):
        options["user_credentials"] = env["NATS_CREDS"]
    if env.get("NATS_USER"):
        options["user"] = env["NATS_USER"]
        options["password"] = env.get("NATS_PASSWORD", "")
    if env.get("NATS_TOKEN"):
        options["token"] = env["NATS_TOKEN"]
    return options


async def main() -> int:
    env = os.environ
    subject = env.get("WORKER_SUBJECT", "demo.stored.>")
    stream = env.get("WORKER_STREAM", "CRON_WORK")
    durable = env.get("WORKER_DURABLE", "workers")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        nc = await nats.connect(**connect_options())
    except Exception as exc:  # any connection failure: report it and exit
        log("could not connect", error=f"{type(exc).__name__}: {exc}")
        return 1
    js = nc.jetstream()
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(
            StreamConfig(
                name=stream,
                subjects=[subject],
                retention=RetentionPolicy.WORK_QUEUE,
                duplicate_window=DUPLICATE_WINDOW,
            )
        )
        log("stream created", stream=stream, subjects=[subject])
    workers = await js.pull_subscribe(subject, durable=durable, stream=stream)
    log("listening", subject=subject, stream=stream, durable=durable)
    done = 0
    while not stop.is_set():
        try:
            messages = await workers.fetch(10, timeout=1)
        except nats.errors.TimeoutError:
            continue
        for msg in messages:
            headers = msg.headers or {}
            # The real work goes here; acknowledge once it is done (an unacknowledged
            # message is delivered again after the consumer's ack wait).
            log(
                "stored fire",
                subject=msg.subject,
                msg_id=headers.get("Nats-Msg-Id"),
                scheduled=headers.get("Nats-Cron-Scheduled"),
                attempt=headers.get("Nats-Cron-Attempt"),
                stream_seq=msg.metadata.sequence.stream,
            )
            await msg.ack()
            done += 1
    await workers.unsubscribe()
    await nc.close()
    log("stopped", done=done)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
