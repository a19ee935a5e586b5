"""`Settings.from_env` / `Connection.from_env` read from a dict, and URL redaction. Pure."""

from __future__ import annotations

import re
import socket
from datetime import timedelta

import pytest

from nats_apscheduler.errors import ConfigError
from nats_apscheduler.settings import Connection, Settings, redact_url


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s == Settings(instance_id=socket.gethostname())
    assert s.connection == Connection()
    assert s.connection.url == "nats://localhost:4222"
    assert s.log_level == "info"
    assert s.log_format == "auto"  # text on a terminal, JSON lines otherwise
    assert s.instance_id == socket.gethostname()
    assert s.jobs_bucket == "nats-cron-jobs"
    assert s.leader_bucket == "nats-cron-leader"
    assert s.events_stream == "NATS_CRON_EVENTS"
    assert s.events_prefix == "nats-cron.events"
    assert s.max_in_flight == 10_000
    assert s.metrics_subjects is True
    assert s.replicas == 1
    # The default lease is a product choice (a few seconds); it must be a valid lease.
    assert timedelta(seconds=1) <= s.lease_ttl <= timedelta(seconds=10)
    assert s.lease_ttl.total_seconds() == int(s.lease_ttl.total_seconds())
    assert s.grace == timedelta(hours=1)
    assert s.min_interval == timedelta(seconds=1)
    assert s.events_depth == 100
    assert s.metrics_port is None
    assert s.validate() is s


def test_empty_values_mean_defaults() -> None:
    env = {
        key: ""
        for key in (
            "NATS_URL",
            "LOG_LEVEL",
            "INSTANCE_ID",
            "NATS_CRON_JOBS_BUCKET",
            "NATS_CRON_LEADER_BUCKET",
            "NATS_CRON_EVENTS_STREAM",
            "NATS_CRON_EVENTS_PREFIX",
            "NATS_CRON_HISTORY_STREAM",
            "NATS_CRON_REPLICAS",
            "NATS_CRON_LEASE_TTL",
            "NATS_CRON_GRACE",
            "NATS_CRON_MIN_INTERVAL",
            "NATS_CRON_EVENTS_DEPTH",
            "NATS_CRON_HISTORY_DEPTH",
            "NATS_CRON_MAX_IN_FLIGHT",
            "NATS_CRON_METRICS_SUBJECTS",
            "NATS_CRON_METRICS_PORT",
            "NATS_CRON_LOG_FORMAT",
            "NATS_PASSWORD",
        )
    }
    assert Settings.from_env(env) == Settings.from_env({})


def test_every_variable() -> None:
    env = {
        "NATS_URL": "nats://a:4222,nats://b:4222",
        "NATS_USER": "alice",
        "NATS_PASSWORD": "pw",
        "LOG_LEVEL": "DEBUG",
        "INSTANCE_ID": "cron-7",
        "NATS_CRON_JOBS_BUCKET": "jobs-x",
        "NATS_CRON_LEADER_BUCKET": "leader-x",
        "NATS_CRON_EVENTS_STREAM": "EVENTS_X",
        "NATS_CRON_EVENTS_PREFIX": "x.events",
        "NATS_CRON_REPLICAS": "3",
        "NATS_CRON_LEASE_TTL": "5s",
        "NATS_CRON_GRACE": "1h30m",
        "NATS_CRON_MIN_INTERVAL": "500ms",
        "NATS_CRON_EVENTS_DEPTH": "20",
        "NATS_CRON_MAX_IN_FLIGHT": "500",
        "NATS_CRON_METRICS_SUBJECTS": "false",
        "NATS_CRON_METRICS_PORT": "9090",
        "UNRELATED": "ignored",
    }
    s = Settings.from_env(env)
    assert s.connection.url == "nats://a:4222,nats://b:4222"
    assert s.connection.user == "alice" and s.connection.password == "pw"
    assert s.log_level == "debug"
    assert s.instance_id == "cron-7"
    assert (s.jobs_bucket, s.leader_bucket, s.events_stream) == ("jobs-x", "leader-x", "EVENTS_X")
    assert s.events_prefix == "x.events"
    assert s.max_in_flight == 500 and s.metrics_subjects is False
    assert s.replicas == 3
    assert s.lease_ttl == timedelta(seconds=5)
    assert s.grace == timedelta(hours=1, minutes=30)
    assert s.min_interval == timedelta(milliseconds=500)
    assert s.events_depth == 20
    assert s.metrics_port == 9090
    assert s.validate() is s
    assert Settings.from_env({"NATS_CRON_METRICS_PORT": "0"}).metrics_port == 0


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1.5h", timedelta(minutes=90)),
        ("2h45m30s", timedelta(hours=2, minutes=45, seconds=30)),
        ("90m", timedelta(minutes=90)),
        ("1500ms", timedelta(milliseconds=1500)),
        ("250000us", timedelta(milliseconds=250)),
        ("300µs", timedelta(microseconds=300)),
        ("+10s", timedelta(seconds=10)),
    ],
)
def test_go_durations(text: str, value: timedelta) -> None:
    assert Settings.from_env({"NATS_CRON_GRACE": text}).grace == value


@pytest.mark.parametrize(
    ("key", "text", "rule"),
    [
        ("NATS_CRON_GRACE", "1d", "unknown unit"),
        ("NATS_CRON_GRACE", "10", "not a duration"),
        ("NATS_CRON_GRACE", "soon", "not a duration"),
        ("NATS_CRON_LEASE_TTL", "0s", "positive"),
        ("NATS_CRON_LEASE_TTL", "0", "positive"),
        ("NATS_CRON_MIN_INTERVAL", "-1s", "positive"),
        ("NATS_CRON_MIN_INTERVAL", "1 s", "not a duration"),
        ("NATS_CRON_REPLICAS", "three", "whole number"),
        ("NATS_CRON_REPLICAS", "0", "at least 1"),
        ("NATS_CRON_REPLICAS", "1.5", "whole number"),
        ("NATS_CRON_HISTORY_DEPTH", "-3", "at least 1"),
        ("NATS_CRON_EVENTS_DEPTH", "0", "at least 1"),
        ("NATS_CRON_MAX_IN_FLIGHT", "0", "at least 1"),
        ("NATS_CRON_METRICS_SUBJECTS", "maybe", "true or false"),
        ("NATS_CRON_METRICS_PORT", "http", "whole number"),
        ("NATS_CRON_METRICS_PORT", "-1", "at least 0"),
        ("LOG_LEVEL", "verbose", "debug, info, warn, error"),
        ("LOG_LEVEL", "trace", "debug, info, warn, error"),
        ("NATS_CRON_LOG_FORMAT", "yaml", "auto, text, json"),
    ],
)
def test_invalid_values_name_the_variable(key: str, text: str, rule: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({key: text})
    assert caught.value.field == key
    assert key in str(caught.value)
    assert rule in str(caught.value)


@pytest.mark.parametrize("level", ["debug", "info", "warn", "warning", "error", "Info", "ERROR"])
def test_log_levels(level: str) -> None:
    assert Settings.from_env({"LOG_LEVEL": level}).log_level == level.lower()


@pytest.mark.parametrize("ttl", ["500ms", "999ms", "1us"])
def test_lease_ttl_below_one_second_rejected_by_validate(ttl: str) -> None:
    settings = Settings.from_env({"NATS_CRON_LEASE_TTL": ttl})  # a valid duration...
    with pytest.raises(ConfigError, match="at least 1s") as caught:
        settings.validate()  # ...but not a valid lease
    assert "lease_ttl" in str(caught.value)
    assert Settings.from_env({"NATS_CRON_LEASE_TTL": "1s"}).validate().lease_ttl == timedelta(
        seconds=1
    )


def test_lease_ttl_must_be_whole_seconds() -> None:
    """The election refuses a fractional TTL (ValueError at start); validate() must catch it
    first, as a configuration error, not let `serve` fail later with an internal error."""
    with pytest.raises(ConfigError, match="lease_ttl"):
        Settings.from_env({"NATS_CRON_LEASE_TTL": "1500ms"}).validate()


def test_override_keeps_unset_fields() -> None:
    base = Settings.from_env({"INSTANCE_ID": "x", "NATS_CRON_REPLICAS": "3"})
    changed = base.override(instance_id=None, replicas=5, grace=timedelta(minutes=1))
    assert (changed.instance_id, changed.replicas, changed.grace) == ("x", 5, timedelta(minutes=1))
    assert base.replicas == 3  # frozen: a copy was made


def test_connection_from_env() -> None:
    env = {
        "NATS_URL": "tls://n1:4222",
        "NATS_CREDS": "/etc/nats/app.creds",
        "NATS_USER": "alice",
        "NATS_PASSWORD": "s3cret",
        "NATS_TOKEN": "t0k",
        "NATS_NKEY": "/etc/nats/seed.nk",
        "NATS_CA": "/etc/nats/ca.pem",
        "NATS_CERT": "/etc/nats/cert.pem",
        "NATS_KEY": "/etc/nats/key.pem",
    }
    conn = Connection.from_env(env)
    assert conn == Connection(
        url="tls://n1:4222",
        creds="/etc/nats/app.creds",
        user="alice",
        password="s3cret",
        token="t0k",
        nkey="/etc/nats/seed.nk",
        tls_ca="/etc/nats/ca.pem",
        tls_cert="/etc/nats/cert.pem",
        tls_key="/etc/nats/key.pem",
    )
    assert Connection.from_env({}) == Connection()
    assert Connection.from_env({"NATS_TOKEN": ""}).token is None
    assert conn.override(user="bob", password=None).user == "bob"
    assert conn.override(user="bob", password=None).password == "s3cret"


def test_repr_hides_secrets() -> None:
    conn = Connection(user="alice", password="s3cret", token="t0k")
    for text in (repr(conn), str(conn), repr(Settings(connection=conn))):
        assert "s3cret" not in text and "t0k" not in text
    assert "alice" in repr(conn)


def test_repr_hides_the_password_in_the_url() -> None:
    """`NATS_URL=nats://user:pass@host` is as secret as `NATS_PASSWORD`."""
    conn = Connection.from_env({"NATS_URL": "nats://alice:S3cretPw@n1:4222"})
    assert "S3cretPw" not in repr(conn)
    assert "S3cretPw" not in repr(Settings(connection=conn))
    assert conn.safe_url == "nats://***@n1:4222"


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("nats://alice:pw@host:4222", "nats://***@host:4222"),
        ("nats://t0ken@host:4222", "nats://***@host:4222"),
        ("tls://alice:p@ss@host", "tls://***@host"),  # an @ inside the password
        ("nats://host:4222", "nats://host:4222"),
        ("nats://localhost", "nats://localhost"),
        (
            "nats://a:pw1@h1:4222,nats://b:pw2@h2:4222, nats://h3:4222",
            "nats://***@h1:4222,nats://***@h2:4222,nats://h3:4222",
        ),
    ],
)
def test_redact_url(url: str, safe: str) -> None:
    assert redact_url(url) == safe
    assert redact_url(safe) == safe


def test_redact_url_without_scheme() -> None:
    """nats-py accepts `user:pass@host:port` (it prepends nats://), so it must be redacted."""
    assert "pw" not in redact_url("alice:pw@host:4222")
    assert "pw" not in redact_url("nats://h1:4222,alice:pw@h2:4222")


@pytest.mark.parametrize("fmt", ["text", "json", "auto", "JSON"])
def test_log_formats(fmt: str) -> None:
    assert Settings.from_env({"NATS_CRON_LOG_FORMAT": fmt}).log_format == fmt.lower()
    with pytest.raises(ConfigError, match="log_format"):
        Settings(log_format="xml").validate()


def test_the_former_history_variables_still_work() -> None:
    s = Settings.from_env({"NATS_CRON_HISTORY_STREAM": "OLD", "NATS_CRON_HISTORY_DEPTH": "7"})
    assert (s.events_stream, s.events_depth) == ("OLD", 7)
    new = {"NATS_CRON_EVENTS_STREAM": "NEW", "NATS_CRON_HISTORY_STREAM": "OLD"}
    assert Settings.from_env(new).events_stream == "NEW"


@pytest.mark.parametrize(
    ("prefix", "words"),
    [
        ("", "must be a subject"),
        ("a..b", "must be a subject"),
        ("events.>", "must be a subject"),
        ("ev *", "must be a subject"),
        ("$SYS.x", "reserved"),
        ("nats-cron.jobs", "API"),
        ("nats-cron.dead.x", "API"),
    ],
)
def test_a_bad_events_prefix_is_refused(prefix: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        Settings(events_prefix=prefix).validate()
    Settings(events_prefix="team-a.cron.events").validate()


def test_the_http_listener_settings() -> None:
    s = Settings.from_env({})
    assert (s.listen_port, s.listen_host, s.http_token) == (None, "127.0.0.1", None)
    s = Settings.from_env(
        {
            "NATS_CRON_HTTP_PORT": "8080",
            "NATS_CRON_HTTP_HOST": "0.0.0.0",
            "NATS_CRON_HTTP_TOKEN": "t0k",
        }
    ).validate()
    assert (s.listen_port, s.listen_host, s.http_token) == (8080, "0.0.0.0", "t0k")
    assert "t0k" not in repr(s)  # never in a log line that prints the settings
    # The former names are the same listener, with the same default address.
    old = Settings.from_env({"NATS_CRON_METRICS_PORT": "9090"}).validate()
    assert (old.listen_port, old.listen_host) == (9090, "127.0.0.1")
    both = Settings.from_env(
        {
            "NATS_CRON_METRICS_PORT": "9090",
            "NATS_CRON_HTTP_PORT": "9090",
            "NATS_CRON_METRICS_HOST": "::",
            "NATS_CRON_HTTP_HOST": "::",
        }
    ).validate()
    assert (both.listen_port, both.listen_host) == (9090, "::")
    assert Settings.from_env({"NATS_CRON_HTTP_PORT": "0"}).listen_port == 0
    flags = Settings.from_env({"NATS_CRON_METRICS_HOST": "0.0.0.0"}).override(http_host="10.0.0.1")
    with pytest.raises(ConfigError, match="differ: one listener"):
        flags.validate()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NATS_CRON_HTTP_PORT": "8080", "NATS_CRON_METRICS_PORT": "9090"}, "8080 and"),
        ({"NATS_CRON_HTTP_HOST": "::1", "NATS_CRON_METRICS_HOST": "0.0.0.0"}, "differ"),
        ({"NATS_CRON_HTTP_PORT": "70000"}, "not a TCP port"),
        ({"NATS_CRON_HTTP_PORT": "-1"}, "at least 0"),
        ({"NATS_CRON_HTTP_PORT": "http"}, "not a whole number"),
        ({"NATS_CRON_HTTP_TOKEN": "has space"}, "printable ASCII"),
        ({"NATS_CRON_HTTP_TOKEN": "tök"}, "printable ASCII"),
    ],
)
def test_bad_http_listener_settings(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        Settings.from_env(env).validate()
    token = env.get("NATS_CRON_HTTP_TOKEN")
    assert token is None or token not in str(caught.value)
