"""The instance's one HTTP listener (aiohttp, on the instance's own event loop): the
dashboard's page and static files, the routes it is given (the JSON API of `webapi`),
`/metrics`, `/healthz` and `/readyz`.

The security model lives here, for every route alike:
- A change is any request but GET and HEAD (a GET changes nothing, whatever it asks).
  With a token, a change needs `Authorization: Bearer <token>` (compared in constant
  time; 401 otherwise). Without one, changes are allowed only on a loopback listener: on
  any other address the listener is read-only (403) until a token is set.
- A change sent by a page of another site is refused (its `Origin` or `Sec-Fetch-Site`
  says so), and a change with a body must say `Content-Type: application/json` (an HTML
  form cannot), so a page the operator visits cannot drive the dashboard (CSRF).
- A loopback listener answers only requests addressed to a loopback name (`Host`): a
  site whose name an attacker re-points at 127.0.0.1 (DNS rebinding) gets 403.
- Every reply carries a Content-Security-Policy that allows scripts, styles and
  connections from this origin only (no inline script, no other origin, no framing).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from aiohttp import web
from loguru import logger

from nats_apscheduler.observe import Metrics

DASHBOARD = Path(__file__).parent / "dashboard"
MAX_BODY = 4 * 1024 * 1024  # a job document with a payload near NATS's max_payload, escaped
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_SAFE_METHODS = frozenset({"GET", "HEAD"})
# Read by monitoring, which may name the listener as it likes; they show no job.
_MONITORING = frozenset({"/metrics", "/healthz", "/readyz"})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
_TEXT = "text/plain"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    """A name or address that only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def error(status: int, message: str, **headers: str) -> web.Response:
    """The API's error body, `{"error": "..."}`, with an HTTP status."""
    return web.json_response({"error": message}, status=status, headers=headers or None)


class HttpListener:
    """Serves the dashboard, its API (`routes`), metrics and probes on `host:port`."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        *,
        token: str | None = None,
        routes: Iterable[web.AbstractRouteDef] = (),
        open_posts: Iterable[str] = (),
    ) -> None:
        """`open_posts`: paths whose POST changes nothing (a preview), open without token."""
        self._metrics = metrics
        self.host = host
        self.port = port
        self._token = token.encode() if token else None
        self._open_posts = frozenset(open_posts)
        self.loopback = is_loopback(host)
        self.app = web.Application(
            middlewares=[self._json_errors, self._guard], client_max_size=MAX_BODY
        )
        self.app.on_response_prepare.append(_security_headers)
        self.app.add_routes(
            [
                web.get("/metrics", self._scrape),
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                web.get("/", self._index),
                web.static("/static", DASHBOARD, append_version=False),
                *routes,
            ]
        )
        self._runner: web.AppRunner | None = None

    @property
    def read_only(self) -> bool:
        """No change is accepted: no token, and reachable from other machines."""
        return self._token is None and not self.loopback

    async def start(self) -> None:
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, shutdown_timeout=2.0)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0]
        self.port = int(address[1])
        shown = f"[{self.host}]" if ":" in self.host else self.host
        logger.bind(
            host=self.host, port=self.port, token=self._token is not None, read_only=self.read_only
        ).info(
            "metrics and health on http://{0}:{1}/metrics, dashboard on http://{0}:{1}/{2}",
            shown,
            self.port,
            " (read-only: no NATS_CRON_HTTP_TOKEN)" if self.read_only else "",
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- middlewares ---------------------------------------------------------------------------

    @web.middleware
    async def _json_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's own errors (no route, wrong method, body too large) as the API's
        `{"error": ...}` under /api/, plain text elsewhere; nothing escapes as a crash."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if not request.path.startswith("/api/"):
                raise
            allow = exc.headers.get("Allow")
            message = {
                404: f"not found: {request.path}",
                405: f"{request.method} is not allowed on {request.path} (allowed: {allow})",
                413: f"request body larger than {MAX_BODY} bytes",
            }.get(exc.status, exc.reason)
            return error(exc.status, message, **({"Allow": allow} if allow else {}))
        except Exception as exc:  # a bug: say so, keep serving
            logger.bind(path=request.path).opt(exception=exc).error("HTTP request failed")
            return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if self.loopback and host is not None and request.path not in _MONITORING:
            name = _host_name(host)
            if name is None or not (is_loopback(name) or name == self.host):
                return error(
                    403,
                    f"Host {host!r} is not served here: this listener is on a loopback "
                    f"address and answers only loopback names (127.0.0.1, localhost, [::1])",
                )
        if request.method in _SAFE_METHODS:
            return await handler(request)
        if _cross_site(request):
            return error(403, "a change sent by a page of another site is refused")
        if request.body_exists and request.content_type != "application/json":
            return error(415, "request body: must be JSON (Content-Type: application/json)")
        if request.method == "POST" and request.path in self._open_posts:
            return await handler(request)
        if self._token is not None:
            if not self._authorized(request):
                logger.bind(
                    path=request.path, method=request.method, requester_host=request.remote
                ).warning("change refused: no valid token")  # rate-limited by the sink
                return error(
                    401,
                    "this change needs the dashboard's token: Authorization: Bearer <token> "
                    "(NATS_CRON_HTTP_TOKEN)",
                    **{"WWW-Authenticate": 'Bearer realm="nats-cron"'},
                )
        elif not self.loopback:
            return error(
                403,
                f"changes are disabled: this listener is on {self.host} and has no token; "
                "set NATS_CRON_HTTP_TOKEN to allow changes",
            )
        return await handler(request)

    def _authorized(self, request: web.Request) -> bool:
        assert self._token is not None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("utf-8", "replace"), self._token)

    # --- metrics, probes, page ------------------------------------------------------------------

    async def _scrape(self, request: web.Request) -> web.Response:
        # Off the loop: with 30,000 jobs an exposition takes ~0.3 s of Python, which on the
        # loop would hold the fires and the lease refresh (a thread shares the GIL, but
        # gives it back to the loop every 5 ms). Collectors read dicts atomically.
        body = await asyncio.to_thread(self._metrics.exposition)
        return _closing(
            web.Response(
                body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
            )
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        if self._metrics.state.connected():
            return _closing(web.Response(text="ok\n", content_type=_TEXT))
        return _closing(web.Response(text="NATS connection lost\n", status=503, content_type=_TEXT))

    async def _readyz(self, request: web.Request) -> web.Response:
        state = self._metrics.state
        if state.connected() and state.ready():
            return _closing(web.Response(text="ready\n", content_type=_TEXT))
        return _closing(web.Response(text="not ready\n", status=503, content_type=_TEXT))

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(DASHBOARD / "index.html")


def _closing(response: web.Response) -> web.Response:
    """Monitoring answers close their connection, as the endpoint before this one did
    (clients that read to the end of the stream, like `HEALTHCHECK` scripts, rely on it)."""
    response.force_close()
    return response


def _host_name(host: str) -> str | None:
    """The name of a `Host` header without its port (`[::1]:80` -> `::1`)."""
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else None
    name, _, _ = host.partition(":")
    return name or None


def _cross_site(request: web.Request) -> bool:
    """Sent by a page of another origin (browsers say so on every change they send)."""
    if request.headers.get("Sec-Fetch-Site", "").lower() in ("cross-site", "same-site"):
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False  # not a browser (curl, a script)
    _scheme, sep, rest = origin.partition("://")
    return not sep or rest.rstrip("/").lower() != request.host.lower()


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    if request.path.startswith("/api/") or request.path == "/":
        headers.setdefault("Cache-Control", "no-store")
    else:
        headers.setdefault("Cache-Control", "no-cache")
