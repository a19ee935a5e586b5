"""The `nats-cron` NATS micro service: the API of SPEC §4 on every instance.

Every endpoint replies JSON. Errors carry the micro headers `Nats-Service-Error` and
`Nats-Service-Error-Code` and a body `{"error": "..."}` (400 bad input, 404 unknown job,
409 conflict, 500 internal, 503 unavailable).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from loguru import logger
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service, ServiceConfig

from nats_apscheduler.errors import SpecError, StoreError
from nats_apscheduler.history import History
from nats_apscheduler.jobs import Conflict, JobManager, NotFound

SERVICE_NAME = "nats-cron"
DESCRIPTION = "NATS Cron Scheduler"
QUEUE_GROUP = "q"
HISTORY_LIMIT_MAX = 1000
# Room left in a list page for the reply's envelope and the micro framework's headers.
_PAGE_HEADROOM = 4096

Handler = Callable[[Any], Awaitable[dict[str, Any] | bytes]]


class ApiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _parse_json(data: bytes, required: bool) -> Any:
    if not data.strip():
        if required:
            raise ApiError(400, "request body: a JSON object is required")
        return {}
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body: invalid JSON ({exc})") from None


def _field(body: Any, name: str) -> str:
    if not isinstance(body, dict):
        raise ApiError(400, f"request body: must be a JSON object with {name!r}")
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{name}: is required and must be a non-empty string")
    return value


class CronService:
    """Registers the micro service and routes requests to the `JobManager`."""

    def __init__(
        self,
        nc: Client,
        version: str,
        instance_id: str,
        jobs: JobManager,
        status: Callable[[], dict[str, Any]],
        history: History | None = None,
        on_request: Callable[[str, int], None] | None = None,
    ) -> None:
        self._nc = nc
        self._version = version
        self._instance_id = instance_id
        self._jobs = jobs
        self._status = status
        self._history = history
        self._on_request = on_request
        self._service: Service | None = None

    async def start(self) -> None:
        self._service = await add_service(
            self._nc,
            ServiceConfig(
                name=SERVICE_NAME,
                version=self._version,
                description=DESCRIPTION,
                metadata={"instance_id": self._instance_id},
                queue_group=QUEUE_GROUP,
            ),
        )
        routes: list[tuple[str, str, Handler, bool]] = [
            ("list", "nats-cron.jobs.list", self._list, False),
            ("get", "nats-cron.jobs.get", self._get, True),
            ("create", "nats-cron.jobs.create", self._create, True),
            ("update", "nats-cron.jobs.update", self._update, True),
            ("delete", "nats-cron.jobs.delete", self._delete, True),
            ("delete-pattern", "nats-cron.jobs.delete.pattern", self._delete_pattern, True),
            ("pause", "nats-cron.jobs.pause", self._pause, True),
            ("resume", "nats-cron.jobs.resume", self._resume, True),
            ("trigger", "nats-cron.jobs.trigger", self._trigger, True),
            ("history", "nats-cron.jobs.history", self._history_of, True),
            ("status", "nats-cron.status", self._status_of, False),
        ]
        for name, subject, handler, needs_body in routes:
            await self._service.add_endpoint(
                EndpointConfig(
                    name=name, subject=subject, handler=self._wrap(name, handler, needs_body)
                )
            )

    async def stop(self) -> None:
        if self._service is not None:
            await self._service.stop()
            self._service = None

    def _wrap(
        self, name: str, handler: Handler, needs_body: bool
    ) -> Callable[[Request], Awaitable[None]]:
        async def endpoint(request: Request) -> None:
            started = time.perf_counter()
            code = 200
            try:
                body = _parse_json(request.data, needs_body)
                reply = await handler(body)
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                await request.respond(data)
            except Exception as exc:  # every failure becomes a reply, never a crash
                code, message = _classify(exc)
                if code >= 500:
                    logger.bind(endpoint=name).opt(exception=exc).error(
                        "request failed: {}", message
                    )
                try:
                    await request.respond_error(
                        str(code), message, data=json.dumps({"error": message}).encode()
                    )
                except (nats.errors.Error, ValueError) as reply_exc:
                    logger.bind(endpoint=name).warning("could not reply: {}", reply_exc)
            finally:
                if self._on_request is not None:
                    self._on_request(name, code)
                logger.bind(endpoint=name, code=code).debug(
                    "request handled in {:.2f} ms", (time.perf_counter() - started) * 1000
                )

        return endpoint

    # --- handlers ----------------------------------------------------------------------------

    async def _list(self, body: Any) -> bytes:
        """One page of jobs in subject order: as many as fit in one message.

        The reply is `{"jobs": [...], "next": s}`; `next` is the subject to send as
        `{"after": s}` for the following page, null on the last one. With few jobs (and
        for clients of the Go version, which send no body) one page holds them all.
        """
        if not isinstance(body, dict):
            raise ApiError(400, "request body: must be empty or a JSON object")
        after = body.get("after")
        if after is not None and not isinstance(after, str):
            raise ApiError(400, "after: must be a string (the `next` of the previous page)")
        budget = self._nc.max_payload - _PAGE_HEADROOM
        pieces: list[bytes] = []
        size, last, more = 0, None, False
        for doc in self._jobs.list_after(after):
            piece = json.dumps(doc).encode()
            if pieces and size + len(piece) + 2 > budget:
                more = True
                break
            pieces.append(piece)
            size += len(piece) + 2
            last = doc["target"]["subject"]
        following = json.dumps(last if more else None).encode()
        return b'{"jobs": [' + b", ".join(pieces) + b'], "next": ' + following + b"}"

    async def _get(self, body: Any) -> dict[str, Any]:
        return self._jobs.get(_field(body, "subject"))

    async def _create(self, body: Any) -> dict[str, Any]:
        await self._jobs.create(body)
        return {"status": "created"}

    async def _update(self, body: Any) -> dict[str, Any]:
        await self._jobs.update(body)
        return {"status": "updated"}

    async def _delete(self, body: Any) -> dict[str, Any]:
        await self._jobs.delete(_field(body, "subject"))
        return {"status": "deleted"}

    async def _delete_pattern(self, body: Any) -> dict[str, Any]:
        deleted = await self._jobs.delete_pattern(_field(body, "pattern"))
        return {"count": len(deleted), "deleted": deleted}

    async def _pause(self, body: Any) -> dict[str, Any]:
        await self._jobs.pause(_field(body, "subject"))
        return {"status": "paused"}

    async def _resume(self, body: Any) -> dict[str, Any]:
        await self._jobs.resume(_field(body, "subject"))
        return {"status": "resumed"}

    async def _trigger(self, body: Any) -> dict[str, Any]:
        scheduled = await self._jobs.trigger(_field(body, "subject"))
        return {"status": "triggered", "scheduled": scheduled}

    async def _history_of(self, body: Any) -> dict[str, Any]:
        subject = _field(body, "subject")
        limit = body.get("limit", 20)
        if (
            not isinstance(limit, int)
            or isinstance(limit, bool)
            or not 1 <= limit <= HISTORY_LIMIT_MAX
        ):
            raise ApiError(400, f"limit: must be a whole number from 1 to {HISTORY_LIMIT_MAX}")
        self._jobs.get(subject)  # 404 for an unknown job
        if self._history is None:
            raise ApiError(503, "history is not enabled on this instance")
        return {"subject": subject, "runs": await self._history.read(subject, limit)}

    async def _status_of(self, body: Any) -> dict[str, Any]:
        return self._status()


def _classify(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, ApiError):
        return exc.code, exc.message
    if isinstance(exc, SpecError):
        return 400, str(exc)
    if isinstance(exc, NotFound):
        return 404, str(exc)
    if isinstance(exc, Conflict):
        return 409, str(exc)
    if isinstance(exc, nats.errors.MaxPayloadError):
        return 500, "reply larger than the server's max_payload"
    if isinstance(exc, StoreError | nats.errors.Error | TimeoutError):
        return 503, f"storage unavailable: {exc}"
    return 500, f"internal error: {type(exc).__name__}: {exc}"
