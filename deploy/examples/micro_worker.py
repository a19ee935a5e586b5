"""An example worker for `request` jobs: a `nats micro` service that replies, and fails on
purpose when asked to.

A job with `"delivery": {"mode": "request"}` sends each fire as a request and waits for the
reply: a reply is `succeeded`, a reply with the micro error headers (`Nats-Service-Error`,
`Nats-Service-Error-Code`, what `respond_error` sends) is `failed`, no reply in time is
`timeout`, and a subject nobody serves is `no_responders`. Any `nats micro` endpoint, in
any language, is a valid target. This one reads the job's payload (JSON) to decide:

    {}                          reply {"ok": true, ...}
    {"sleep": 2.5}              reply after 2.5 s (other requests are served meanwhile)
    {"fail": "disk full"}       reply with error 500 "disk full"
    {"fail_attempts": 2}        fail attempts 1 and 2 (Nats-Cron-Attempt), succeed on 3
    {"fail_every": 3}           fail every third request of this worker

Needs only nats-py (`pip install nats-py`). Configuration from the environment:

    NATS_URL        server URL(s), comma-separated (default nats://localhost:4222)
    NATS_CREDS      credentials file; or NATS_USER + NATS_PASSWORD; or NATS_TOKEN
    WORKER_SUBJECT  the endpoint's subject, `>` allowed at the end (default demo.work.>)
    WORKER_NAME     the micro service's name (default cron-worker)

    python deploy/examples/micro_worker.py

It writes one JSON line per request to stdout (subject, run id, attempt, what it answered).
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
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, ServiceConfig


def log(msg: str, **fields: Any) -> None:
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "msg": msg, **fields}
    print(json.dumps(record), flush=True)


def connect_options() -> dict[str, Any]:
    env = os.environ
    servers = [s.strip() for s in env.get("NATS_URL", "nats://localhost:4222").split(",")]
    options: dict[str, Any] = {
        "servers": [s for s in servers if s],
        "name": "nats-cron-example-micro-worker",
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


class Worker:
    def __init__(self) -> None:
        self.served = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, request: Request) -> None:
        # nats-py calls a subscription's handler for one message at a time: the work runs
        # in its own task, so that a slow request does not hold the others up.
        task = asyncio.get_running_loop().create_task(self.work(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def work(self, request: Request) -> None:
        self.served += 1
        headers = request.headers or {}
        attempt = int(headers.get("Nats-Cron-Attempt", "1") or 1)
        run_id = headers.get("Nats-Cron-Run-Id")
        try:
            order = json.loads(request.data) if request.data else {}
        except ValueError:
            order = {}
        if not isinstance(order, dict):
            order = {}
        if isinstance(order.get("sleep"), int | float):
            await asyncio.sleep(float(order["sleep"]))
        failure = None
        if order.get("fail"):
            failure = str(order["fail"]) if order["fail"] is not True else "failed on purpose"
        elif isinstance(order.get("fail_attempts"), int) and attempt <= order["fail_attempts"]:
            failure = f"attempt {attempt} fails on purpose"
        elif (
            isinstance(order.get("fail_every"), int)
            and order["fail_every"] > 0
            and self.served % order["fail_every"] == 0
        ):
            failure = f"request {self.served} fails on purpose"
        fields = {"subject": request.subject, "run_id": run_id, "attempt": attempt}
        try:
            if failure is not None:
                await request.respond_error("500", failure)
                log("failed", error=failure, **fields)
            else:
                reply = {"ok": True, "worker": os.getpid(), **fields}
                await request.respond(json.dumps(reply).encode())
                log("replied", **fields)
        except Exception as exc:  # the connection is gone: nothing to reply on
            log("could not reply", error=f"{type(exc).__name__}: {exc}", **fields)


async def main() -> int:
    subject = os.environ.get("WORKER_SUBJECT", "demo.work.>")
    name = os.environ.get("WORKER_NAME", "cron-worker")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        nc = await nats.connect(**connect_options())
    except Exception as exc:  # any connection failure: report it and exit
        log("could not connect", error=f"{type(exc).__name__}: {exc}")
        return 1
    worker = Worker()
    service = await add_service(
        nc, ServiceConfig(name=name, version="1.0.0", description="nats-cron example worker")
    )
    await service.add_endpoint(EndpointConfig(name="work", subject=subject, handler=worker.handle))
    await nc.flush()
    log("listening", subject=subject, service=name, server=nc.connected_url.netloc)
    await stop.wait()
    await service.stop()
    await nc.drain()
    log("stopped", served=worker.served)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
