"""The `nats-cron` NATS micro service: the API of SPEC §4 on every instance.

Every endpoint replies JSON. Errors carry the micro headers `Nats-Service-Error` and
`Nats-Service-Error-Code` and a body `{"error": "..."}` (400 bad input, 404 unknown job,
409 conflict, 500 internal, 503 unavailable). A request with the header
`Nats-Cron-Dry-Run: true` is validated and answered as if done, and changes nothing.
Every change is logged at info with the requester's identity (when the server adds
`Nats-Request-Info`) and published on `nats-cron.changes.<job subject>`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats.errors
from loguru import logger
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service, ServiceConfig

import nats_apscheduler.protocol as protocol
from nats_apscheduler.errors import ApiError, Conflict, NotFound, SpecError, StoreError
from nats_apscheduler.fire import rfc3339
from nats_apscheduler.history import History
from nats_apscheduler.jobs import JobManager

SERVICE_NAME = "nats-cron"
DESCRIPTION = "NATS Cron Scheduler"
QUEUE_GROUP = "q"
HISTORY_LIMIT_MAX = 1000
# Room left in a list page for the reply's envelope and the micro framework's headers.
_PAGE_HEADROOM = 4096
# Fields of `Nats-Request-Info` that name the requester (never its JWT or nonce).
_REQUESTER_FIELDS = {"acc": "account", "user": "user", "name": "name", "host": "host"}


@dataclass
class Call:
    """One request's context: its dry-run flag and who sent it (as the server says)."""

    dry_run: bool = False
    requester: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, headers: dict[str, str] | None) -> Call:
        headers = headers or {}
        flag = headers.get(protocol.DRY_RUN_HEADER, "").strip().lower()
        if flag not in ("", "true", "false", "1", "0"):
            raise ApiError(400, f"{protocol.DRY_RUN_HEADER}: {flag!r} is not true or false")
        return cls(dry_run=flag in ("true", "1"), requester=_requester(headers))


Handler = Callable[[Any, Call], Awaitable[dict[str, Any] | bytes]]


def parse_json(data: bytes, required: bool) -> Any:
    if not data.strip():
        if required:
            raise ApiError(400, "request body: a JSON object is required")
        return {}
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body: invalid JSON ({exc})") from None
    except RecursionError:  # e.g. thousands of nested arrays
        raise ApiError(400, "request body: JSON nested too deeply") from None


def _requester(headers: dict[str, str]) -> dict[str, str]:
    """Who sent a request, from the `Nats-Request-Info` header the server adds when the
    API is imported from another account; {} without it (or if it cannot be read)."""
    raw = headers.get(protocol.REQUEST_INFO_HEADER)
    if not raw:
        return {}
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(info, dict):
        return {}
    return {
        name: str(info[key])
        for key, name in _REQUESTER_FIELDS.items()
        if isinstance(info.get(key), str | int) and info.get(key) != ""
    }


def _flag(body: Any, name: str) -> bool:
    value = body.get(name, False) if isinstance(body, dict) else False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name}: must be true or false")
    return value


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
        for name, subject, handler, needs_body in self._routes():
            await self._service.add_endpoint(
                EndpointConfig(
                    name=name, subject=subject, handler=self._wrap(name, handler, needs_body)
                )
            )

    def _routes(self) -> list[tuple[str, str, Handler, bool]]:
        """(endpoint name, subject, handler, whether a body is required)."""
        return [
            ("list", protocol.LIST, self._list, False),
            ("get", protocol.GET, self._get, True),
            ("create", protocol.CREATE, self._create, True),
            ("update", protocol.UPDATE, self._update, True),
            ("delete", protocol.DELETE, self._delete, True),
            ("delete-pattern", protocol.DELETE_PATTERN, self._delete_pattern, True),
            ("pause", protocol.PAUSE, self._pause, True),
            ("resume", protocol.RESUME, self._resume, True),
            ("trigger", protocol.TRIGGER, self._trigger, True),
            ("history", protocol.HISTORY, self._history_of, True),
            ("apply", protocol.APPLY, self._apply, True),
            ("status", protocol.STATUS, self._status_of, False),
        ]

    async def handle(self, endpoint: str, body: Any, call: Call) -> dict[str, Any] | bytes:
        """One request that came through another door (the HTTP API of `webapi`): the
        same handler as over NATS, so the same validation, reply, change log line and
        change event. Errors are raised; `classify` turns them into the API's codes."""
        for name, _, handler, _ in self._routes():
            if name == endpoint:
                return await handler(body, call)
        raise ApiError(404, f"no endpoint {endpoint!r}")

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
                call = Call.of(request.headers)
                body = parse_json(request.data, needs_body)
                reply = await handler(body, call)
                data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
                await request.respond(data)
            except Exception as exc:  # every failure becomes a reply, never a crash
                code, message = classify(exc)
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

    # --- changes: the audit log line and the event ----------------------------------------------

    async def _changed(self, call: Call, change: str, subject: str, endpoint: str) -> None:
        """Log a change made through the API (info) and publish it on
        `nats-cron.changes.<subject>`; a dry run only logs at debug."""
        log = logger.bind(
            subject=subject,
            endpoint=endpoint,
            **{f"requester_{key}": value for key, value in call.requester.items()},
        )
        if call.dry_run:
            log.debug("dry run: job would be {}", change)
            return
        revision = self._jobs.revision(subject)
        log.bind(revision=revision).info("job {}", change)
        event: dict[str, Any] = {
            "change": change,
            "subject": subject,
            "revision": revision,
            "time": rfc3339(datetime.now(UTC)),
            "instance": self._instance_id,
            "requester": call.requester or None,
            "job": None,
        }
        if change != "deleted":
            with contextlib.suppress(NotFound, SpecError):
                event["job"] = self._jobs.get(subject)
        data = json.dumps(event).encode()
        if len(data) > self._nc.max_payload - _PAGE_HEADROOM:
            event["job"] = None  # a job with a payload near max_payload: the change only
            data = json.dumps(event).encode()
        try:
            await self._nc.publish(protocol.changes_subject(subject), data)
        except (nats.errors.Error, OSError) as exc:  # the change is made; only its event is lost
            log.warning("could not publish the change event: {}", exc)

    @staticmethod
    def _reply(call: Call, reply: dict[str, Any]) -> dict[str, Any]:
        return {**reply, "dry_run": True} if call.dry_run else reply

    # --- handlers ----------------------------------------------------------------------------

    async def _list(self, body: Any, call: Call) -> bytes:
        """One page of jobs in subject order: as many as fit in one message.

        The reply is `{"jobs": [...], "next": s}`; `next` is the subject to send as
        `{"after": s}` for the following page, null on the last one. With few jobs (and
        for clients of the Go version, which send no body) one page holds them all.
        `{"pattern": "orders.>"}` lists only the jobs matching a NATS wildcard pattern.
        """
        if not isinstance(body, dict):
            raise ApiError(400, "request body: must be empty or a JSON object")
        after = body.get("after")
        if after is not None and not isinstance(after, str):
            raise ApiError(400, "after: must be a string (the `next` of the previous page)")
        pattern = body.get("pattern")
        if pattern is not None and not isinstance(pattern, str):
            raise ApiError(400, "pattern: must be a string (a subject or NATS wildcard pattern)")
        budget = self._nc.max_payload - _PAGE_HEADROOM
        pieces: list[bytes] = []
        size, last, more = 0, None, False
        await self._jobs.refresh(None)
        for doc in self._jobs.list_after(after, pattern):
            piece = json.dumps(doc).encode()
            if pieces and size + len(piece) + 2 > budget:
                more = True
                break
            pieces.append(piece)
            size += len(piece) + 2
            last = doc["target"]["subject"]
        following = json.dumps(last if more else None).encode()
        return b'{"jobs": [' + b", ".join(pieces) + b'], "next": ' + following + b"}"

    async def _get(self, body: Any, call: Call) -> dict[str, Any]:
        subject = _field(body, "subject")
        await self._jobs.refresh([subject])
        return self._jobs.get(subject)

    async def _create(self, body: Any, call: Call) -> dict[str, Any]:
        spec = await self._jobs.create(body, dry_run=call.dry_run)
        await self._changed(call, "created", spec.subject, "create")
        reply: dict[str, Any] = {"status": "created", "subject": spec.subject}
        if not call.dry_run:
            reply["revision"] = self._jobs.revision(spec.subject)
        return self._reply(call, reply)

    async def _update(self, body: Any, call: Call) -> dict[str, Any]:
        """An upsert, as in Go. A `revision` in the document is a precondition: the job
        must still be at that revision (0: must not exist), else 409 (404 if deleted)."""
        expected = body.get("revision") if isinstance(body, dict) else None
        if expected is not None and (
            not isinstance(expected, int) or isinstance(expected, bool) or expected < 0
        ):
            raise ApiError(400, "revision: must be a whole number >= 0 (0: the job must not exist)")
        spec, created = await self._jobs.upsert(
            body, expected_revision=expected, dry_run=call.dry_run
        )
        change = "created" if created else "updated"
        await self._changed(call, change, spec.subject, "update")
        reply: dict[str, Any] = {"status": "updated", "subject": spec.subject, "created": created}
        if not call.dry_run:
            reply["revision"] = self._jobs.revision(spec.subject)
        return self._reply(call, reply)

    async def _delete(self, body: Any, call: Call) -> dict[str, Any]:
        """Idempotent, as in Go: `existed` says whether there was a job to delete."""
        subject = _field(body, "subject")
        existed = await self._jobs.delete(subject, dry_run=call.dry_run)
        if existed:
            await self._changed(call, "deleted", subject, "delete")
        return self._reply(call, {"status": "deleted", "subject": subject, "existed": existed})

    async def _delete_pattern(self, body: Any, call: Call) -> dict[str, Any]:
        deleted = await self._jobs.delete_pattern(_field(body, "pattern"), dry_run=call.dry_run)
        for subject in deleted:
            await self._changed(call, "deleted", subject, "delete-pattern")
        return self._reply(call, {"count": len(deleted), "deleted": deleted})

    async def _pause(self, body: Any, call: Call) -> dict[str, Any]:
        subject = _field(body, "subject")
        await self._jobs.pause(subject, dry_run=call.dry_run)
        await self._changed(call, "paused", subject, "pause")
        return self._reply(call, {"status": "paused", "subject": subject})

    async def _resume(self, body: Any, call: Call) -> dict[str, Any]:
        subject = _field(body, "subject")
        await self._jobs.resume(subject, dry_run=call.dry_run)
        await self._changed(call, "resumed", subject, "resume")
        return self._reply(call, {"status": "resumed", "subject": subject})

    async def _trigger(self, body: Any, call: Call) -> dict[str, Any]:
        """`{"subject": s, "force": true}` also runs a paused job once (it stays paused)."""
        subject = _field(body, "subject")
        force = _flag(body, "force")
        scheduled = await self._jobs.trigger(subject, force=force, dry_run=call.dry_run)
        await self._changed(call, "triggered", subject, "trigger")
        return self._reply(
            call, {"status": "triggered", "subject": subject, "scheduled": scheduled}
        )

    async def _apply(self, body: Any, call: Call) -> dict[str, Any]:
        """`{"jobs": [document, ...], "delete": [subject, ...]}`: each document becomes
        its subject's job (an upsert that leaves a job already so untouched), each listed
        subject is deleted. The reply has one result per item, in order (`subject`,
        `action`: created, changed, unchanged, deleted, absent, invalid or failed, and
        `error`); invalid items do not stop the others. For `nats-cron apply`, which sends
        a large file in batches."""
        if not isinstance(body, dict):
            raise ApiError(400, "request body: must be a JSON object with jobs and/or delete")
        documents = body.get("jobs", [])
        deletes = body.get("delete", [])
        if not isinstance(documents, list):
            raise ApiError(400, "jobs: must be an array of job documents")
        if not isinstance(deletes, list) or not all(isinstance(s, str) for s in deletes):
            raise ApiError(400, "delete: must be an array of subjects")
        results = await self._jobs.apply(documents, deletes, dry_run=call.dry_run)
        changes = {"created": "created", "changed": "updated", "deleted": "deleted"}
        for result in results:
            change = changes.get(result["action"])
            if change is not None:
                await self._changed(call, change, result["subject"], "apply")
        return self._reply(call, {"results": results})

    async def _history_of(self, body: Any, call: Call) -> dict[str, Any]:
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

    async def _status_of(self, body: Any, call: Call) -> dict[str, Any]:
        """The instance's status, plus where to follow changes and runs live."""
        status = dict(self._status())
        status["changes_subject"] = protocol.CHANGES_PREFIX
        if self._history is not None:
            status["events_subject"] = self._history.prefix
            status["history_subject"] = self._history.prefix  # its name before events
            status["dead_letter_subject"] = protocol.DEAD_PREFIX
        return status


def classify(exc: Exception) -> tuple[int, str]:
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
