"""The replying worker of bench/delivery.py (not a benchmark itself): a child process that
subscribes to `<prefix>.>`, stamps every message on arrival, and answers those with a reply
subject, at once or, for every `slow_every`-th job (by the number ending its subject), after
`slow_s` seconds (on a timer: the other requests are not held up).

    python bench/_responder.py '{"url": ..., "prefix": ..., "slow_every": 10, "slow_s": 2,
                                 "out": "/tmp/records.json"}'

Prints `{"ready": true}` once subscribed; on a line `stop` on stdin (or its end) writes
`[subject index, scheduled (unix s), received (unix s)]` per message to `out`, then prints
`{"done": n, "cpu_s": ...}`.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from datetime import datetime
from typing import Any

import nats
from nats.aio.msg import Msg


async def main(cfg: dict[str, Any]) -> None:
    nc = await nats.connect(cfg["url"], pending_size=64 * 1024 * 1024)
    loop = asyncio.get_running_loop()
    slow_every = int(cfg.get("slow_every") or 0)
    slow_s = float(cfg.get("slow_s") or 0)
    records: list[tuple[str, str, float]] = []

    late: set[asyncio.Task[None]] = set()

    def reply_late(reply: str) -> None:
        if not nc.is_closed:  # (stopped meanwhile: the request has timed out for good)
            task = loop.create_task(nc.publish(reply, b"slow"))
            late.add(task)
            task.add_done_callback(late.discard)

    async def on_msg(msg: Msg) -> None:
        received = time.time()
        headers = msg.headers or {}
        records.append((msg.subject, headers.get("Nats-Cron-Scheduled", ""), received))
        if not msg.reply:
            return
        index = int(msg.subject.rsplit(".", 1)[1])
        if slow_every and index % slow_every == 0:
            loop.call_later(slow_s, reply_late, msg.reply)
        else:
            await nc.publish(msg.reply, b"ok")

    await nc.subscribe(
        f"{cfg['prefix']}.>", cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
    )
    await nc.flush()
    print(json.dumps({"ready": True}), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line or line.strip() == b"stop":
            break
    await nc.close()
    out = []
    for subject, scheduled, received in records:
        if not scheduled:
            continue
        index = int(subject.rsplit(".", 1)[1])
        out.append([index, datetime.fromisoformat(scheduled).timestamp(), received])
    with open(cfg["out"], "w") as f:
        json.dump(out, f)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"done": len(out), "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
