"""An example nats-cron worker: subscribe to job subjects and log every fire.

nats-cron only publishes; the work happens in subscribers like this one, in any language.
Each fire carries the headers `Nats-Msg-Id` (`<subject>:<scheduled unix ms>`, the same for
every publish of one slot), `Nats-Cron-Job`, `Nats-Cron-Scheduled` (RFC 3339),
`Nats-Cron-Instance` and `Nats-Cron-Epoch`. This worker writes one JSON line per fire to
stdout.

Needs only nats-py (`pip install nats-py`). Configuration from the environment:

    NATS_URL        server URL(s), comma-separated (default nats://localhost:4222)
    NATS_CREDS      credentials file; or NATS_USER + NATS_PASSWORD; or NATS_TOKEN
    WORKER_SUBJECT  subject to subscribe to, wildcards allowed (default demo.>)
    WORKER_QUEUE    queue group, so that several workers share the fires (default: none,
                    every worker gets every fire)

    python deploy/examples/worker.py

A worker that must see each slot exactly once reads the subject through a JetStream
stream instead of a core subscription: the stream drops a repeated `Nats-Msg-Id`.
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
from nats.aio.msg import Msg

CRON_HEADERS = (
    "Nats-Msg-Id",
    "Nats-Cron-Job",
    "Nats-Cron-Scheduled",
    "Nats-Cron-Instance",
    "Nats-Cron-Epoch",
)


def log(msg: str, **fields: Any) -> None:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "msg": msg, **fields}
    print(json.dumps(record), flush=True)


def connect_options() -> dict[str, Any]:
    env = os.environ
    servers = [s.strip() for s in env.get("NATS_URL", "nats://localhost:4222").split(",")]
    options: dict[str, Any] = {
        "servers": [s for s in servers if s],
        "name": "nats-cron-example-worker",
        "max_reconnect_attempts": -1,  # keep trying: a worker should outlive NATS restarts
    }
    if env.get("NATS_CREDS"):
        options["user_credentials"] = env["NATS_CREDS"]
    if env.get("NATS_USER"):
        options["user"] = env["NATS_USER"]
        options["password"] = env.get("NATS_PASSWORD", "")
    if env.get("NATS_TOKEN"):
        options["token"] = env["NATS_TOKEN"]
    return options


async def handle(msg: Msg) -> None:
    headers = msg.headers or {}
    try:
        body: Any = json.loads(msg.data) if msg.data else None
    except ValueError:
        body = msg.data.decode("utf-8", "replace")
    log(
        "fire received",
        subject=msg.subject,
        headers={name: headers[name] for name in CRON_HEADERS if name in headers},
        data=body,
    )
    # The real work would go here. A fire is a plain publish: nobody waits for a reply.


async def main() -> int:
    subject = os.environ.get("WORKER_SUBJECT", "demo.>")
    queue = os.environ.get("WORKER_QUEUE", "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def disconnected() -> None:
        log("NATS connection lost")

    async def reconnected() -> None:
        log("NATS connection restored")

    try:
        nc = await nats.connect(
            **connect_options(), disconnected_cb=disconnected, reconnected_cb=reconnected
        )
    except Exception as exc:  # any connection failure: report it and exit
        log("could not connect", error=f"{type(exc).__name__}: {exc}")
        return 1
    await nc.subscribe(subject, queue=queue, cb=handle)
    await nc.flush()
    log("listening", subject=subject, queue=queue or None, server=nc.connected_url.netloc)
    await stop.wait()
    await nc.drain()  # finish the messages already received, then close
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
