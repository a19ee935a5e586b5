"""The JSON API of the dashboard: the NATS API's operations over HTTP (SPEC §12).

Every change goes through the micro service's own handler (`CronService.handle`), so it
gets the same validation, reply document, audit log line and change event as over NATS;
the requester is the HTTP client's address (`requester_host`, `requester_via: http`).
Errors are the NATS API's: `{"error": "..."}` with the same code as HTTP status (400, 404,
409, 500, 503). Dry runs: the header `Nats-Cron-Dry-Run: true` or `?dry_run=true`.

    GET    /api/jobs[?pattern=&after=&limit=]   {"jobs", "next", "words"}: a page
    POST   /api/jobs                           create (201)
    GET    /api/jobs/{subject}[?limit=]        {"job", "words", "timezone", "next", "history"}
    PUT    /api/jobs/{subject}                 replace (201 if created); a `revision` in the
                                               document or `If-Match` is a precondition
    DELETE /api/jobs/{subject}                 idempotent, `existed` says if it was there
    POST   /api/jobs/{subject}/pause|resume|trigger   (trigger: `{"force": true}`)
    POST   /api/preview[?count=]               validate a document, its next fire times
    GET    /api/status                         the NATS API's status reply
    GET    /api/instances                      every instance (micro discovery), and this
                                               instance's figures from its metrics

A subject's `/` may be sent as is or as %2F: a POST ending in `/pause`, `/resume` or
`/trigger` is that action (so job `a/pause` is paused by `POST /api/jobs/a/pause/pause`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web
from loguru import logger

from nats_apscheduler.cron import fire_times
from nats_apscheduler.errors import ApiError, SpecError
from nats_apscheduler.jobs import JobManager
from nats_apscheduler.observe import Metrics
from nats_apscheduler.service import Call, CronService, classify, parse_json
from nats_apscheduler.spec import parse_job
from nats_apscheduler.words import describe

NEXT_TIMES = 10
PAGE_DEFAULT = 500
PAGE_MAX = 5000
HISTORY_DEFAULT = 20
PREVIEW_MAX = 100
DISCOVERY_TTL = 2.0  # seconds a discovery answer is reused (every open page polls it)
PREVIEW_PATH = "/api/preview"
ACTIONS = ("pause", "resume", "trigger")
Discover = Callable[[str], Awaitable[list[dict[str, Any]]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _api(handler: Handler) -> Handler:
    """Errors of every kind become the NATS API's error body and code."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise  # aiohttp's own (e.g. body too large): web.py makes them JSON
        except Exception as exc:
            code, message = classify(exc)
            if code >= 500:
                logger.bind(path=request.path, method=request.method).opt(exception=exc).error(
                    "HTTP API request failed: {}", message
                )
            return web.json_response({"error": message}, status=code)

    return wrapped


def _int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
        raise ApiError(400, f"{name}: must be a whole number from {low} to {high}")
    return int(text)


def _flag(text: str | None, name: str) -> bool:
    flag = (text or "").strip().lower()
    if flag not in ("", "true", "false", "1", "0"):
        raise ApiError(400, f"{name}: {flag!r} is not true or false")
    return flag in ("true", "1")


def _call(request: web.Request) -> Call:
    """The request's context for the service: dry run, and who sent it (its address; a
    `Nats-Request-Info` header sent over HTTP is not believed)."""
    dry_run = _flag(request.headers.get("Nats-Cron-Dry-Run"), "Nats-Cron-Dry-Run") or _flag(
        request.query.get("dry_run"), "dry_run"
    )
    return Call(dry_run=dry_run, requester={"host": request.remote or "?", "via": "http"})


def _times(times: Sequence[datetime], zone: str) -> list[dict[str, str]]:
    tz = ZoneInfo(zone)
    return [
        {
            "utc": t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "local": t.astimezone(tz).isoformat(timespec="milliseconds"),
        }
        for t in times
    ]


def _zone_of(document: Any) -> str:
    """The zone a stored job's schedule is in (a `TZ=` prefix included), UTC if none."""
    try:
        return parse_job(document, min_interval=timedelta(0)).timezone
    except SpecError:
        return "UTC"


class WebApi:
    """The routes of the JSON API, for `web.HttpListener`."""

    def __init__(
        self,
        jobs: JobManager,
        service: CronService,
        metrics: Metrics,
        discover: Discover,
    ) -> None:
        self._jobs = jobs
        self._service = service
        self._metrics = metrics
        self._discover = discover
        self._discovered: tuple[float, list[dict[str, Any]]] | None = None
        self._discovering: asyncio.Lock = asyncio.Lock()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/jobs", _api(self._list)),
            web.post("/api/jobs", _api(self._create)),
            web.post("/api/jobs/{subject:.+}/{action:pause|resume|trigger}", _api(self._action)),
            web.get("/api/jobs/{subject:.+}", _api(self._get)),
            web.put("/api/jobs/{subject:.+}", _api(self._replace)),
            web.delete("/api/jobs/{subject:.+}", _api(self._delete)),
            web.post(PREVIEW_PATH, _api(self._preview)),
            web.get("/api/status", _api(self._status)),
            web.get("/api/instances", _api(self._instances)),
        ]

    async def _handle(self, endpoint: str, body: Any, call: Call) -> Any:
        reply = await self._service.handle(endpoint, body, call)
        return json.loads(reply) if isinstance(reply, bytes) else reply

    # --- reads --------------------------------------------------------------------------------

    async def _list(self, request: web.Request) -> web.Response:
        """A page of jobs in subject order (`next`: the `after` of the following page),
        with each one's schedule in words for the table."""
        limit = _int(request, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
        pattern = request.query.get("pattern") or None
        after = request.query.get("after") or None
        await self._jobs.refresh(None)  # other shards' run state, as the NATS API's list does
        page = list(itertools.islice(self._jobs.list_after(after, pattern), limit + 1))
        more = len(page) > limit
        page = page[:limit]
        words = {doc["target"]["subject"]: describe(doc.get("schedule")) for doc in page}
        following = page[-1]["target"]["subject"] if more else None
        return web.json_response({"jobs": page, "next": following, "words": words})

    async def _get(self, request: web.Request) -> web.Response:
        """The job (as `nats-cron.jobs.get` replies it), its schedule in words, its next
        fire times in UTC and in its zone, and its latest runs (`?limit=`, newest first)."""
        subject = request.match_info["subject"]
        limit = _int(request, "limit", HISTORY_DEFAULT, 1, 1000)
        call = Call()
        job = await self._handle("get", {"subject": subject}, call)
        try:
            runs = (await self._handle("history", {"subject": subject, "limit": limit}, call))[
                "runs"
            ]
        except ApiError:  # no history on this instance: the job all the same
            runs = None
        zone = _zone_of(job)
        times = self._jobs.next_times(subject, NEXT_TIMES)
        reply = {
            "job": job,
            "words": describe(job.get("schedule")),
            "timezone": zone,
            "next": _times(times, zone),
            "history": runs,
        }
        return web.json_response(reply, headers={"ETag": f'"{job.get("revision", 0)}"'})

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(await self._handle("status", {}, Call()))

    async def _instances(self, request: web.Request) -> web.Response:
        """Every running instance (micro `$SRV.PING` and `STATS`, as `nats-cron instances`),
        its role, and the request counts of its endpoints; this instance's figures."""
        status = await self._handle("status", {}, Call())
        instances = await self._instances_of(status)
        return web.json_response({"instances": instances, "figures": self._figures()})

    async def _instances_of(self, status: dict[str, Any]) -> list[dict[str, Any]]:
        async with self._discovering:  # many pages polling: one discovery at a time
            cached = self._discovered
            if cached is None or time.monotonic() - cached[0] > DISCOVERY_TTL:
                pings = await self._discover("PING")
                stats = {s.get("id"): s for s in await self._discover("STATS")}
                cached = (time.monotonic(), [{**p, "stats": stats.get(p.get("id"))} for p in pings])
                self._discovered = cached
        leader = (status.get("leader") or {}).get("instance_id")
        held: dict[str, list[int]] = {}
        for shard in status.get("shards") or []:
            if isinstance(shard, dict) and shard.get("owner"):
                held.setdefault(str(shard["owner"]), []).append(shard.get("shard", -1))
        out = []
        for ping in cached[1]:
            instance_id = str((ping.get("metadata") or {}).get("instance_id", "?"))
            endpoints = (ping.get("stats") or {}).get("endpoints") or []
            shards = held.get(instance_id, [])
            out.append(
                {
                    "instance_id": instance_id,
                    "role": "leader" if instance_id == leader or shards else "follower",
                    "shards": sorted(shards),
                    "version": ping.get("version"),
                    "id": ping.get("id"),
                    "started": (ping.get("stats") or {}).get("started"),
                    "requests": sum(int(e.get("num_requests") or 0) for e in endpoints),
                    "errors": sum(int(e.get("num_errors") or 0) for e in endpoints),
                    "endpoints": {
                        str(e.get("name")): {
                            "requests": e.get("num_requests", 0),
                            "errors": e.get("num_errors", 0),
                            "average_ms": round((e.get("average_processing_time") or 0) / 1e6, 3),
                        }
                        for e in endpoints
                    },
                }
            )
        return sorted(out, key=lambda i: (i["role"] != "leader", i["instance_id"]))

    def _figures(self) -> dict[str, Any]:
        """What this instance's /metrics says, the cheap figures (no per-job series)."""
        s = self._metrics.state
        requests: dict[str, float] = {}
        for family in self._metrics.api_requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    code = sample.labels.get("code", "?")
                    requests[code] = requests.get(code, 0) + sample.value
        return {
            "nats_cron_is_leader": int(s.is_leader()),
            "nats_cron_jobs": s.jobs(),
            "nats_cron_nats_connected": int(s.connected()),
            "nats_cron_fires_total": self._metrics.fired_total(),
            "nats_cron_leader_changes_total": s.leader_changes(),
            "nats_cron_lease_refresh_failures_total": s.refresh_failures(),
            "nats_cron_shards_held": s.shards_held(),
            "nats_cron_handovers_total": s.handovers(),
            "nats_cron_unconfirmed_fires_total": s.unconfirmed(),
            "nats_cron_runs_in_flight": s.in_flight(),
            "nats_cron_runs_in_flight_limit": s.in_flight_limit(),
            "nats_cron_loop_lag_max_seconds": round(s.loop_lag(), 6),
            "nats_cron_loop_lag_recent_seconds": round(s.loop_lag_recent(), 6),
            "nats_cron_api_requests_total": {k: int(v) for k, v in sorted(requests.items())},
        }

    async def _preview(self, request: web.Request) -> web.Response:
        """Validate a job document as `create` would (same rules, same errors) and return
        its next fire times, storing nothing: the form's live preview."""
        count = _int(request, "count", NEXT_TIMES, 1, PREVIEW_MAX)
        body = parse_json(await request.read(), True)
        spec = self._jobs.parse(body)
        now = datetime.now(UTC)
        document = spec.to_document()
        times = fire_times(spec.trigger(now), now, count)
        reply = {
            "valid": True,
            "subject": spec.subject,
            "job": document,
            "words": describe(document["schedule"]),
            "timezone": spec.timezone,
            "next": _times(times, spec.timezone),
        }
        return web.json_response(reply)

    # --- changes ------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        call = _call(request)
        body = parse_json(await request.read(), True)
        reply = await self._handle("create", body, call)
        return web.json_response(reply, status=200 if call.dry_run else 201)

    async def _replace(self, request: web.Request) -> web.Response:
        """Create or replace the job at this URL. The document may leave its subject out;
        one naming another subject is refused. `If-Match: "<revision>"` (or a `revision`
        in the document) makes the change conditional, as in the NATS API."""
        subject = request.match_info["subject"]
        call = _call(request)
        body = parse_json(await request.read(), True)
        if not isinstance(body, dict):
            raise ApiError(400, "request body: must be a JSON object (a job document)")
        body = dict(body)
        named = _subject_in(body)
        target = body.get("target")
        if named is None and (target is None or isinstance(target, dict)):
            body["target"] = {**(target or {}), "subject": subject}
        elif named is not None and named != subject:
            raise ApiError(
                400, f"target.subject: {named!r} is not the subject of this URL ({subject!r})"
            )
        match = request.headers.get("If-Match")
        if match is not None:
            revision = _revision(match)
            if body.get("revision") is not None and body["revision"] != revision:
                raise ApiError(
                    400, f"revision: {body['revision']!r} differs from If-Match {match!r}"
                )
            body["revision"] = revision
        reply = await self._handle("update", body, call)
        created = bool(reply.get("created")) and not call.dry_run
        return web.json_response(reply, status=201 if created else 200)

    async def _delete(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        reply = await self._handle("delete", {"subject": subject}, _call(request))
        return web.json_response(reply)

    async def _action(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        action = request.match_info["action"]
        call = _call(request)
        body = parse_json(await request.read(), False)
        if not isinstance(body, dict):
            raise ApiError(400, "request body: must be empty or a JSON object")
        request_body: dict[str, Any] = {"subject": subject}
        if action == "trigger":
            force = body.get("force", False)
            if not isinstance(force, bool):
                raise ApiError(400, "force: must be true or false")
            request_body["force"] = force or _flag(request.query.get("force"), "force")
        reply = await self._handle(action, request_body, call)
        return web.json_response(reply)


def _subject_in(body: dict[str, Any]) -> str | None:
    target = body.get("target")
    if isinstance(target, dict) and "subject" in target:
        return str(target["subject"])
    if "subject" in body:
        return str(body["subject"])
    return None


def _revision(header: str) -> int:
    text = header.strip().removeprefix("W/").strip('"')
    if not text.isascii() or not text.isdigit():
        raise ApiError(400, f"If-Match: {header!r} is not a revision (a whole number, quoted)")
    return int(text)
