"""A typed async client for the nats-cron API (used by the CLI and the tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription

import nats_apscheduler.protocol as protocol
from nats_apscheduler.errors import ApiError, NatsCronError, NoService

Documents = list[dict[str, Any]]  # aliased: the method `list` shadows the builtin
# Room left in a request for the envelope and headers when `apply` fills a batch.
_BATCH_HEADROOM = 4096
_BATCH_ITEMS = 500  # documents per `apply` request (a request's work stays well under a second)


class Feed:
    """Live JSON events from a subscription, in arrival order, from the moment it was
    made (`async for event in feed`); `close()` ends it. Undecodable messages are skipped.
    If the connection closes first, the iteration raises `ConnectionClosedError`."""

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub
        self._closed = False

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        async for msg in self._sub.messages:
            try:
                event = json.loads(msg.data)
            except ValueError:
                continue
            if isinstance(event, dict):
                yield event
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError  # nats-py ends the iteration when cancelled
        if not self._closed:
            raise nats.errors.ConnectionClosedError

    async def close(self) -> None:
        self._closed = True
        with contextlib.suppress(nats.errors.Error):  # no connection: no subscription either
            await self._sub.unsubscribe()


class CronClient:
    def __init__(self, nc: Client, timeout: float = 5.0) -> None:
        self._nc = nc
        self.timeout = timeout

    async def request(self, subject: str, body: Any = None, *, dry_run: bool = False) -> Any:
        """One API request; `dry_run` asks the service to validate and report only."""
        data = b"" if body is None else json.dumps(body).encode()
        headers = {protocol.DRY_RUN_HEADER: "true"} if dry_run else None
        try:
            msg = await self._nc.request(subject, data, timeout=self.timeout, headers=headers)
        except nats.errors.NoRespondersError:
            raise NoService(f"no nats-cron instance answers on {subject}") from None
        except nats.errors.TimeoutError:
            raise NoService(f"no reply on {subject} within {self.timeout:g}s") from None
        headers = msg.headers or {}
        code = headers.get("Nats-Service-Error-Code")
        try:
            reply = json.loads(msg.data) if msg.data else {}
        except ValueError:
            reply = {}
        if code:
            message = (reply.get("error") if isinstance(reply, dict) else None) or headers.get(
                "Nats-Service-Error", "error"
            )
            raise ApiError(int(code) if code.isdigit() else 500, message)
        if isinstance(reply, dict) and "error" in reply and len(reply) == 1:
            raise ApiError(500, str(reply["error"]))
        return reply

    async def list(self, pattern: str | None = None) -> Documents:
        """Every job (matching the NATS wildcard `pattern`), following the pages of
        `nats-cron.jobs.list`. Each carries its `revision`."""
        base = {} if pattern is None else {"pattern": pattern}
        reply = await self.request(protocol.LIST, base or None)
        jobs = list(reply["jobs"])
        while reply.get("next"):
            reply = await self.request(protocol.LIST, {**base, "after": reply["next"]})
            jobs.extend(reply["jobs"])
        return jobs

    async def get(self, subject: str) -> dict[str, Any]:
        return dict(await self.request(protocol.GET, {"subject": subject}))

    async def create(self, document: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        return dict(await self.request(protocol.CREATE, document, dry_run=dry_run))

    async def update(
        self, document: dict[str, Any], *, revision: int | None = None, dry_run: bool = False
    ) -> dict[str, Any]:
        """Create or replace (an upsert). With `revision` (or a `revision` field in the
        document, as `get` returns it) only if the job is still at that revision (0: only
        if it does not exist): `ApiError` 409 otherwise."""
        body = dict(document) if revision is None else {**document, "revision": revision}
        return dict(await self.request(protocol.UPDATE, body, dry_run=dry_run))

    async def delete(self, subject: str, *, dry_run: bool = False) -> dict[str, Any]:
        """Idempotent; the reply's `existed` tells whether there was such a job."""
        body = {"subject": subject}
        return dict(await self.request(protocol.DELETE, body, dry_run=dry_run))

    async def delete_pattern(self, pattern: str, *, dry_run: bool = False) -> dict[str, Any]:
        body = {"pattern": pattern}
        return dict(await self.request(protocol.DELETE_PATTERN, body, dry_run=dry_run))

    async def pause(self, subject: str, *, dry_run: bool = False) -> dict[str, Any]:
        body = {"subject": subject}
        return dict(await self.request(protocol.PAUSE, body, dry_run=dry_run))

    async def resume(self, subject: str, *, dry_run: bool = False) -> dict[str, Any]:
        body = {"subject": subject}
        return dict(await self.request(protocol.RESUME, body, dry_run=dry_run))

    async def trigger(
        self, subject: str, *, force: bool = False, dry_run: bool = False
    ) -> dict[str, Any]:
        """Fire once now; `force` also runs a paused job once (it stays paused)."""
        body: dict[str, Any] = {"subject": subject}
        if force:
            body["force"] = True
        return dict(await self.request(protocol.TRIGGER, body, dry_run=dry_run))

    async def apply(
        self,
        documents: Sequence[dict[str, Any]],
        deletes: Iterable[str] = (),
        *,
        dry_run: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> Documents:
        """Make each document its subject's job and delete `deletes`, in batches that fit
        the server's max_payload; one result per item, in order (see the README's API
        table). `progress(n)` is called after each batch with the items it held."""
        items: list[tuple[str, Any]] = [("jobs", doc) for doc in documents]
        items += [("delete", subject) for subject in deletes]
        budget = max(self._nc.max_payload - _BATCH_HEADROOM, 1024)
        results: Documents = []
        batch: dict[str, list[Any]] = {"jobs": [], "delete": []}
        size = count = 0

        async def send() -> None:
            nonlocal batch, size, count
            if count:
                reply = await self.request(protocol.APPLY, batch, dry_run=dry_run)
                results.extend(reply["results"])
                if progress is not None:
                    progress(count)
            batch, size, count = {"jobs": [], "delete": []}, 0, 0

        for kind, item in items:
            piece = len(json.dumps(item)) + 2
            if count and (size + piece > budget or count >= _BATCH_ITEMS):
                await send()
            batch[kind].append(item)
            size += piece
            count += 1
        await send()
        return results

    async def history(self, subject: str, limit: int = 20) -> dict[str, Any]:
        body = {"subject": subject, "limit": limit}
        return dict(await self.request(protocol.HISTORY, body))

    async def status(self) -> dict[str, Any]:
        return dict(await self.request(protocol.STATUS))

    async def changes(self, pattern: str = ">") -> Feed:
        """Follow job changes made through the API (`nats-cron.changes.<subject>`), live,
        for the subjects matching `pattern`. Subscribed when this returns: list after it
        to miss nothing."""
        sub = await self._nc.subscribe(protocol.changes_subject(pattern))
        await self._nc.flush(timeout=math.ceil(self.timeout))
        return Feed(sub)

    async def runs(self, pattern: str = ">", history_subject: str | None = None) -> Feed:
        """Follow the run history records of the jobs matching `pattern`, live, as the
        leader publishes them. `history_subject` (the `status` reply's) is asked for if
        not given."""
        if history_subject is None:
            history_subject = (await self.status()).get("history_subject")
            if not isinstance(history_subject, str) or not history_subject:
                raise NatsCronError("this nats-cron service does not publish its history subject")
        sub = await self._nc.subscribe(f"{history_subject}.{pattern}")
        await self._nc.flush(timeout=math.ceil(self.timeout))
        return Feed(sub)

    async def discover(self, verb: str = "PING", wait: float = 0.5) -> Documents:
        """Scatter-gather `$SRV.<verb>.nats-cron`: one reply per running instance."""
        inbox = f"_INBOX.{secrets.token_hex(8)}"
        replies: Documents = []
        sub = await self._nc.subscribe(inbox)
        try:
            await self._nc.publish(f"$SRV.{verb}.nats-cron", b"", reply=inbox)
            while True:
                try:
                    msg = await sub.next_msg(timeout=wait)
                except nats.errors.TimeoutError:
                    break
                try:
                    replies.append(json.loads(msg.data))
                except ValueError:
                    continue
        finally:
            await sub.unsubscribe()
        return replies
