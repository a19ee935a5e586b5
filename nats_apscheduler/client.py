"""A typed async client for the nats-cron API (used by the CLI and the tests)."""

from __future__ import annotations

import json
import secrets
from typing import Any

import nats.errors
from nats.aio.client import Client

from nats_apscheduler.errors import NatsCronError

Documents = list[dict[str, Any]]  # aliased: the method `list` shadows the builtin


class ApiError(NatsCronError):
    """The service answered with an error (`code` is its HTTP-like status)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NoService(NatsCronError):
    """Nobody answered: no nats-cron instance is running, or it timed out."""


class CronClient:
    def __init__(self, nc: Client, timeout: float = 5.0) -> None:
        self._nc = nc
        self.timeout = timeout

    async def request(self, subject: str, body: Any = None) -> Any:
        data = b"" if body is None else json.dumps(body).encode()
        try:
            msg = await self._nc.request(subject, data, timeout=self.timeout)
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

    async def list(self) -> Documents:
        """Every job, following the pages of `nats-cron.jobs.list`."""
        reply = await self.request("nats-cron.jobs.list")
        jobs = list(reply["jobs"])
        while reply.get("next"):
            reply = await self.request("nats-cron.jobs.list", {"after": reply["next"]})
            jobs.extend(reply["jobs"])
        return jobs

    async def get(self, subject: str) -> dict[str, Any]:
        return dict(await self.request("nats-cron.jobs.get", {"subject": subject}))

    async def create(self, document: dict[str, Any]) -> dict[str, Any]:
        return dict(await self.request("nats-cron.jobs.create", document))

    async def update(self, document: dict[str, Any]) -> dict[str, Any]:
        return dict(await self.request("nats-cron.jobs.update", document))

    async def delete(self, subject: str) -> dict[str, Any]:
        return dict(await self.request("nats-cron.jobs.delete", {"subject": subject}))

    async def delete_pattern(self, pattern: str) -> dict[str, Any]:
        return dict(await self.request("nats-cron.jobs.delete.pattern", {"pattern": pattern}))

    async def pause(self, subject: str) -> dict[str, Any]:
        return dict(await self.request("nats-cron.jobs.pause", {"subject": subject}))

    async def resume(self, subject: str) -> dict[str, Any]:
        return dict(await self.request("nats-cron.jobs.resume", {"subject": subject}))

    async def trigger(self, subject: str) -> dict[str, Any]:
        return dict(await self.request("nats-cron.jobs.trigger", {"subject": subject}))

    async def history(self, subject: str, limit: int = 20) -> dict[str, Any]:
        body = {"subject": subject, "limit": limit}
        return dict(await self.request("nats-cron.jobs.history", body))

    async def status(self) -> dict[str, Any]:
        return dict(await self.request("nats-cron.status"))

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
