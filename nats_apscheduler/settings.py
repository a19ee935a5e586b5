"""Frozen `Settings` read once from the environment (`Settings.from_env(environ)`); no I/O.

Connection variables follow the `nats` CLI (`NATS_URL`, `NATS_CREDS`, `NATS_USER`,
`NATS_PASSWORD`, `NATS_TOKEN`, `NATS_NKEY`, `NATS_CA`, `NATS_CERT`, `NATS_KEY`); the
scheduler's own settings share the `NATS_CRON_` prefix. Flags override both.
"""

from __future__ import annotations

import dataclasses
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from nats_apscheduler.durations import parse_duration
from nats_apscheduler.errors import ConfigError, SpecError

MAX_SHARDS = 1024
# The HTTP listener (dashboard, its API, /metrics, probes) binds here unless configured:
# reachable from this machine only, since the dashboard can change jobs.
DEFAULT_HTTP_HOST = "127.0.0.1"
_TOKEN = re.compile(r"[-/_=a-zA-Z0-9]+")
# The API's own subject trees under `nats-cron.` (protocol.py); an events prefix there
# would mix events into them.
_API_TOKENS = ("jobs", "status", "changes", "dead")
LOG_LEVELS = ("debug", "info", "warn", "warning", "error")
# "auto": text on a terminal, JSON lines otherwise (resolved by the application).
LOG_FORMATS = ("auto", "text", "json")


@dataclass(frozen=True)
class Connection:
    """How to reach NATS; the secrets never appear in `repr` or logs."""

    url: str = "nats://localhost:4222"
    creds: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkey: str | None = None  # path of an NKey seed file
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    timeout: float = 5.0
    name: str = "nats-cron"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Connection:
        def get(key: str) -> str | None:
            return environ.get(key) or None

        return cls(
            url=get("NATS_URL") or cls.url,
            creds=get("NATS_CREDS"),
            user=get("NATS_USER"),
            password=get("NATS_PASSWORD"),
            token=get("NATS_TOKEN"),
            nkey=get("NATS_NKEY"),
            tls_ca=get("NATS_CA"),
            tls_cert=get("NATS_CERT"),
            tls_key=get("NATS_KEY"),
        )

    def override(self, **changes: Any) -> Connection:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)

    def __repr__(self) -> str:
        return (
            f"Connection(url={self.safe_url!r}, creds={self.creds!r}, user={self.user!r}, "
            f"nkey={self.nkey!r}, tls_ca={self.tls_ca!r}, tls_cert={self.tls_cert!r}, "
            f"tls_key={self.tls_key!r}, timeout={self.timeout!r}, name={self.name!r})"
        )


def redact_url(url: str) -> str:
    """`nats://user:pass@host:4222` -> `nats://***@host:4222` (every URL of a list)."""
    out = []
    for part in url.split(","):
        part = part.strip()
        scheme, sep, rest = part.rpartition("://")
        # Userinfo ends at the last "@" before the path; nats-py also takes "user:pw@host".
        authority, slash, path = rest.partition("/")
        if "@" in authority:
            authority = "***@" + authority.rsplit("@", 1)[1]
        out.append(f"{scheme}{sep}{authority}{slash}{path}")
    return ",".join(out)


def _duration(environ: Mapping[str, str], key: str, default: timedelta) -> timedelta:
    text = environ.get(key)
    if not text:
        return default
    try:
        value = parse_duration(text, key)
    except SpecError as exc:  # a duration's own rule, reported as the setting's
        raise ConfigError(exc.field, exc.rule) from None
    if value <= timedelta(0):
        raise ConfigError(key, f"{text!r} must be positive")
    return value


def _int(environ: Mapping[str, str], key: str, default: int, low: int = 1) -> int:
    text = environ.get(key)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(key, f"{text!r} is not a whole number") from None
    if value < low:
        raise ConfigError(key, f"must be at least {low}")
    return value


def _bool(environ: Mapping[str, str], key: str, default: bool) -> bool:
    text = (environ.get(key) or "").strip().lower()
    if not text:
        return default
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(key, f"{text!r} is not true or false")


@dataclass(frozen=True)
class Settings:
    """Everything `nats-cron serve` is configured with."""

    connection: Connection = field(default_factory=Connection)
    log_level: str = "info"
    log_format: str = "auto"
    instance_id: str = field(default_factory=socket.gethostname)
    jobs_bucket: str = "nats-cron-jobs"
    leader_bucket: str = "nats-cron-leader"
    events_stream: str = "NATS_CRON_EVENTS"  # the run history (SPEC §10)
    events_prefix: str = "nats-cron.events"  # events go to <prefix>.<job subject>
    replicas: int = 1
    lease_ttl: timedelta = timedelta(seconds=2)
    grace: timedelta = timedelta(hours=1)
    min_interval: timedelta = timedelta(seconds=1)
    events_depth: int = 100  # events kept per job
    max_in_flight: int = 10_000  # requests and JetStream publishes awaiting their reply
    shards: int = 1  # fixed per deployment (recorded in the leader bucket)
    # One HTTP listener: the dashboard and its API, /metrics, /healthz, /readyz. None: off.
    http_port: int | None = None
    http_host: str | None = None  # None: DEFAULT_HTTP_HOST (see `listen_host`)
    http_token: str | None = field(default=None, repr=False)  # changes need it (Bearer)
    # The same listener under its former names (NATS_CRON_METRICS_PORT/HOST); see `listen_port`.
    metrics_port: int | None = None
    metrics_host: str | None = None
    metrics_subjects: bool = True  # per-job series (off for deployments with very many jobs)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        level = (environ.get("LOG_LEVEL") or "info").lower()
        if level not in LOG_LEVELS:
            raise ConfigError("LOG_LEVEL", f"{level!r} is not one of debug, info, warn, error")
        metrics = environ.get("NATS_CRON_METRICS_PORT")
        http = environ.get("NATS_CRON_HTTP_PORT")
        log_format = (environ.get("NATS_CRON_LOG_FORMAT") or "auto").lower()
        if log_format not in LOG_FORMATS:
            raise ConfigError(
                "NATS_CRON_LOG_FORMAT", f"{log_format!r} is not one of {', '.join(LOG_FORMATS)}"
            )
        return cls(
            connection=Connection.from_env(environ),
            log_level=level,
            log_format=log_format,
            instance_id=environ.get("INSTANCE_ID") or socket.gethostname(),
            jobs_bucket=environ.get("NATS_CRON_JOBS_BUCKET") or cls.jobs_bucket,
            leader_bucket=environ.get("NATS_CRON_LEADER_BUCKET") or cls.leader_bucket,
            # The former names of the events settings (the history stream) still work.
            events_stream=environ.get("NATS_CRON_EVENTS_STREAM")
            or environ.get("NATS_CRON_HISTORY_STREAM")
            or cls.events_stream,
            events_prefix=environ.get("NATS_CRON_EVENTS_PREFIX") or cls.events_prefix,
            replicas=_int(environ, "NATS_CRON_REPLICAS", 1),
            lease_ttl=_duration(environ, "NATS_CRON_LEASE_TTL", cls.lease_ttl),
            grace=_duration(environ, "NATS_CRON_GRACE", cls.grace),
            min_interval=_duration(environ, "NATS_CRON_MIN_INTERVAL", cls.min_interval),
            events_depth=_int(
                environ,
                "NATS_CRON_EVENTS_DEPTH"
                if environ.get("NATS_CRON_EVENTS_DEPTH")
                else "NATS_CRON_HISTORY_DEPTH",
                100,
            ),
            max_in_flight=_int(environ, "NATS_CRON_MAX_IN_FLIGHT", cls.max_in_flight),
            shards=_int(environ, "NATS_CRON_SHARDS", 1),
            http_port=_int(environ, "NATS_CRON_HTTP_PORT", 0, low=0) if http else None,
            http_host=environ.get("NATS_CRON_HTTP_HOST") or None,
            http_token=environ.get("NATS_CRON_HTTP_TOKEN") or None,
            metrics_port=_int(environ, "NATS_CRON_METRICS_PORT", 0, low=0) if metrics else None,
            metrics_host=environ.get("NATS_CRON_METRICS_HOST") or None,
            metrics_subjects=_bool(environ, "NATS_CRON_METRICS_SUBJECTS", True),
        )

    @property
    def listen_port(self) -> int | None:
        """The HTTP listener's port (`http_port`, or its former name `metrics_port`); None:
        no listener. 0: any free port."""
        return self.http_port if self.http_port is not None else self.metrics_port

    @property
    def listen_host(self) -> str:
        """The HTTP listener's address: `http_host`, or `metrics_host`, else 127.0.0.1."""
        return self.http_host or self.metrics_host or DEFAULT_HTTP_HOST

    def override(self, **changes: Any) -> Settings:
        """A copy with the given non-None fields replaced (flags over environment)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def validate(self) -> Settings:
        if self.log_format not in LOG_FORMATS:
            raise ConfigError("log_format", f"{self.log_format!r} is not one of text, json, auto")
        if self.lease_ttl < timedelta(seconds=1):
            raise ConfigError("lease_ttl", "must be at least 1s (the server's per-key TTL minimum)")
        if self.lease_ttl % timedelta(seconds=1):
            raise ConfigError("lease_ttl", "must be whole seconds (the server's per-key TTL unit)")
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ConfigError("shards", f"must be from 1 to {MAX_SHARDS}")
        if self.max_in_flight < 1:
            raise ConfigError("max_in_flight", "must be at least 1")
        if self.events_depth < 1:
            raise ConfigError("events_depth", "must be at least 1")
        _check_prefix(self.events_prefix)
        self._validate_http()
        return self

    def _validate_http(self) -> None:
        """The listener has two names (the metrics port came first): both may be given
        only if they agree."""
        for name, value in (("http_port", self.http_port), ("metrics_port", self.metrics_port)):
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(name, f"{value} is not a TCP port (0 to 65535; 0: any free one)")
        pairs = (
            ("port", self.http_port, self.metrics_port),
            ("host", self.http_host, self.metrics_host),
        )
        for what, new, old in pairs:
            if new is not None and old is not None and new != old:
                raise ConfigError(
                    f"http_{what}",
                    f"NATS_CRON_HTTP_{what.upper()} (--http-{what}) {new} and "
                    f"NATS_CRON_METRICS_{what.upper()} (--metrics-{what}) {old} differ: one "
                    "listener serves the dashboard, the metrics and the probes; set one of them",
                )
        token = self.http_token
        if token is not None and (
            not token or not all(33 <= ord(c) <= 126 for c in token)  # an HTTP header value
        ):
            raise ConfigError(
                "NATS_CRON_HTTP_TOKEN",
                "must be printable ASCII without spaces (it travels in an Authorization header)",
            )


def _check_prefix(prefix: str) -> None:
    """The events prefix: a concrete subject, not one of the API's own subjects."""
    where = "events_prefix (NATS_CRON_EVENTS_PREFIX)"
    if prefix.startswith("$"):
        raise ConfigError(where, f"{prefix!r}: subjects starting with $ are reserved for NATS")
    tokens = prefix.split(".")
    if not prefix or any(not t or not _TOKEN.fullmatch(t) for t in tokens):
        raise ConfigError(
            where,
            f"{prefix!r} must be a subject: tokens of letters, digits and - / _ = joined by .",
        )
    if tokens[0] == "nats-cron" and len(tokens) > 1 and tokens[1] in _API_TOKENS:
        raise ConfigError(where, f"{prefix!r} would overlap the API's subjects")
