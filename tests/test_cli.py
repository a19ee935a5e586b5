"""The `nats-cron` CLI, run as real processes against real `nats-cron serve` processes.

Most tests share one module-scoped service on a nats-server of this module's own (the API
subjects `nats-cron.*` are not per bucket, so two services on one server would answer each
other's requests); each test uses subjects under a prefix of its own.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import pty
import re
import shlex
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import typer.main
from nats_cron_cli.app import app
from typer.testing import CliRunner

from nats_apscheduler import __version__
from nats_apscheduler.embedded import EmbeddedNatsServer
from tests.helpers.cli_run import (
    CLI,
    Cli,
    Service,
    cli_env,
    closed_port_url,
    service_env,
    start_service,
)
from tests.helpers.cluster import ServeProcess

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
RUN_STATE = {"next_run", "last_run", "last_scheduled", "run_count", "last_error", "paused"}

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    srv = EmbeddedNatsServer(tmp_path_factory.mktemp("cli-js")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def service(server: EmbeddedNatsServer) -> Iterator[Service]:
    svc = start_service(server, "cli-main")
    yield svc
    svc.proc.stop()


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    """A nats-server on which no nats-cron instance runs."""
    srv = EmbeddedNatsServer(tmp_path_factory.mktemp("cli-empty-js")).start()
    yield srv
    srv.stop()


@pytest.fixture
def xdg(tmp_path: Path) -> Path:
    path = tmp_path / "xdg"
    path.mkdir()
    return path


@pytest.fixture
def cli(service: Service, xdg: Path) -> Cli:
    return Cli(cli_env(xdg, service.url))


@pytest.fixture
def offline(xdg: Path) -> Cli:
    """The CLI with NATS_URL on a closed port: nothing may need a server."""
    return Cli(cli_env(xdg, closed_port_url()))


@pytest.fixture
def prefix() -> str:
    """A subject prefix no other test of this module uses."""
    return f"clit{next(_prefixes)}"


def get_job(cli: Cli, subject: str) -> dict[str, Any]:
    job: dict[str, Any] = cli.fast_ok("get", subject, "--json").json()
    return job


def subjects(cli: Cli, prefix: str) -> list[str]:
    jobs = cli.fast_ok("list", "--json").json()["jobs"]
    return sorted(
        j["target"]["subject"] for j in jobs if j["target"]["subject"].startswith(prefix + ".")
    )


def wait_for_runs(cli: Cli, subject: str, count: int, timeout: float = 5.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        runs: list[Any] = cli.fast_ok("history", subject, "--json").json()["runs"]
        if len(runs) >= count:
            return runs
        assert time.monotonic() < deadline, f"only {len(runs)} run(s) of {subject}: {runs}"
        time.sleep(0.02)  # poll interval


def no_success_claim(out: str) -> None:
    for word in ("added", "created", "updated", "deleted", "paused", "resumed", "triggered"):
        assert not re.search(rf"(?m)^{word} ", out), out


# --- help and version: no server needed ----------------------------------------------------

ALL_COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_every_documented_command_is_registered() -> None:
    expected = {
        "serve", "list", "ls", "get", "create", "update", "add", "delete", "del", "status",
        "pause", "resume", "trigger", "history", "instances", "validate", "next",
        "export", "apply",
    }  # fmt: skip
    assert set(ALL_COMMANDS) == expected


def test_app_help_and_version_without_server(offline: Cli) -> None:
    result = offline.ok("--help")
    assert "Usage:" in result.out
    for name in ("add", "list", "delete", "status", "instances", "validate", "next", "serve"):
        assert re.search(rf"(?m)^\s+{name}\b", result.out), result.out
    assert "Exit codes" in result.out
    assert result.elapsed < 5
    version = offline.ok("--version")
    assert version.out.strip() == __version__


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_command_help_without_server(command: str, xdg: Path) -> None:
    env = cli_env(xdg, closed_port_url())
    result = CliRunner().invoke(app, [command, "--help"], env=env)
    assert result.exit_code == 0, result.output
    assert f"Usage: nats-cron {command}" in result.output
    assert "error:" not in result.output


def test_subcommand_help_in_a_real_process(offline: Cli) -> None:
    result = offline.ok("add", "--help")
    # run as `python -m nats_cron_cli`, click names the program after the module
    assert re.match(r"Usage: .* add \[OPTIONS\]", result.out), result.out
    assert "--tz" in result.out and "--payload-type" in result.out


# --- offline tools ------------------------------------------------------------------------


VALID_DOC = (
    '{"target": {"subject": "reports.weekday"},'
    ' "schedule": {"cron": "0 9 * * MON-FRI", "timezone": "Europe/Berlin"}}'
)
INVALID_DOC = '{"target": {"subject": "reports.daily"}, "schedule": {"every": "1d"}}'


def test_validate_valid_document(offline: Cli, tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(VALID_DOC)
    result = offline.ok("validate", str(path))
    assert "valid job for reports.weekday" in result.out
    rows = [line for line in result.out.splitlines() if re.match(r"^\d+\s", line)]
    assert len(rows) == 5  # the default count
    assert "UTC" in result.out and "Europe/Berlin" in result.out
    assert result.err == ""

    data = offline.ok("validate", str(path), "--json", "-n", "3").json()
    assert data["valid"] is True
    assert data["subject"] == "reports.weekday"
    assert len(data["next"]) == 3
    berlin = [datetime.fromisoformat(t).astimezone(ZoneInfo("Europe/Berlin")) for t in data["next"]]
    assert all(t.weekday() < 5 and (t.hour, t.minute) == (9, 0) for t in berlin), berlin
    assert berlin == sorted(berlin)


def test_validate_invalid_document_names_field_and_rule(offline: Cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(INVALID_DOC)
    result = offline.fails(2, "validate", str(path))
    assert 'schedule.every: "1d": unknown unit "d"' in result.err
    assert result.out == ""

    data = offline("validate", str(path), "--json")
    assert data.code == 2, str(data)
    assert data.json()["valid"] is False
    assert 'schedule.every: "1d": unknown unit "d"' in data.json()["error"]


def test_validate_reads_stdin(offline: Cli) -> None:
    result = offline.ok("validate", "-", input=VALID_DOC)
    assert "valid job for reports.weekday" in result.out
    bad = offline.fails(2, "validate", "-", input=INVALID_DOC)
    assert 'unknown unit "d"' in bad.err
    junk = offline.fails(2, "validate", "-", input="not json")
    assert "not valid JSON" in junk.err


def test_validate_missing_file(offline: Cli, tmp_path: Path) -> None:
    result = offline.fails(2, "validate", str(tmp_path / "nope.json"))
    assert "nope.json" in result.err
    assert result.out == ""


def test_next_cron_in_a_zone(offline: Cli) -> None:
    table = offline.ok("next", "0 9 * * MON-FRI", "--tz", "Europe/Berlin", "-n", "3")
    rows = [line for line in table.out.splitlines() if re.match(r"^\d+\s", line)]
    assert len(rows) == 3, table.out
    header = table.out.splitlines()[0]
    assert "UTC" in header and "Europe/Berlin" in header
    assert all(re.search(r"09:00:00 CES?T", row) for row in rows), rows

    data = offline.ok("next", "0 9 * * MON-FRI", "--tz", "Europe/Berlin", "-n", "3", "--json")
    times = [datetime.fromisoformat(t) for t in data.json()["next"]]
    assert len(times) == 3
    now = datetime.now(UTC)
    for moment in times:
        assert moment.utcoffset() == timedelta(0)
        local = moment.astimezone(ZoneInfo("Europe/Berlin"))
        assert local.weekday() < 5 and (local.hour, local.minute, local.second) == (9, 0, 0)
        assert now < moment < now + timedelta(days=5)
    assert times == sorted(times) and len(set(times)) == 3


def test_next_every(offline: Cli) -> None:
    table = offline.ok("next", "90m", "-n", "2")
    rows = [line for line in table.out.splitlines() if re.match(r"^\d+\s", line)]
    assert len(rows) == 2, table.out

    before = datetime.now(UTC)
    times = [datetime.fromisoformat(t) for t in offline.ok("next", "90m", "-n", "2", "--json")
             .json()["next"]]  # fmt: skip
    assert len(times) == 2
    assert times[1] - times[0] == timedelta(minutes=90)
    assert before + timedelta(minutes=89) < times[0] < before + timedelta(minutes=91)


def test_next_invalid_cron(offline: Cli) -> None:
    result = offline.fails(2, "next", "61 * * * *")
    assert "schedule.cron" in result.err and "61" in result.err
    assert result.out == ""


# --- jobs against the running service -----------------------------------------------------


def test_add_detects_cron_and_duration(cli: Cli, prefix: str) -> None:
    assert cli.ok("add", f"{prefix}.every", "30s").out.strip() == f"added {prefix}.every"
    cli.ok("add", f"{prefix}.cron", "*/5 * * * *")
    cli.ok("add", f"{prefix}.at", "@daily")
    cli.ok("add", f"{prefix}.compound", "1h30m")

    assert get_job(cli, f"{prefix}.every")["schedule"] == {"every": "30s"}
    assert get_job(cli, f"{prefix}.cron")["schedule"] == {"cron": "*/5 * * * *", "timezone": "UTC"}
    assert get_job(cli, f"{prefix}.at")["schedule"] == {"cron": "@daily", "timezone": "UTC"}
    assert get_job(cli, f"{prefix}.compound")["schedule"] == {"every": "1h30m"}
    job = get_job(cli, f"{prefix}.every")
    assert "payload" not in job
    assert job["paused"] is False and job["next_run"] is not None


def test_add_payload_kinds(cli: Cli, prefix: str) -> None:
    cli.ok("add", f"{prefix}.json", "1h", '{"table":"sessions","older_than":"7d"}')
    cli.ok("add", f"{prefix}.text", "1h", "hello world")
    cli.ok("add", f"{prefix}.forced", "1h", '{"a":1}', "--payload-type", "text")
    cli.ok("add", f"{prefix}.b64", "1h", "aGVsbG8=", "--payload-type", "base64")

    assert get_job(cli, f"{prefix}.json")["payload"]["type"] == "json"
    assert get_job(cli, f"{prefix}.text")["payload"] == {"type": "text", "data": "hello world"}
    assert get_job(cli, f"{prefix}.forced")["payload"] == {"type": "text", "data": '{"a":1}'}
    assert get_job(cli, f"{prefix}.b64")["payload"] == {"type": "base64", "data": "aGVsbG8="}
    payload = get_job(cli, f"{prefix}.json")["payload"]
    assert json.loads(payload["data"]) == {"table": "sessions", "older_than": "7d"}


def test_add_with_options(cli: Cli, prefix: str) -> None:
    subject = f"{prefix}.opts"
    cli.ok(
        "add", subject, "0 9 * * MON", "--tz", "Europe/Berlin",
        "--jitter", "5s", "--grace", "10m", "--paused",
    )  # fmt: skip
    job = get_job(cli, subject)
    assert job["schedule"] == {
        "cron": "0 9 * * MON",
        "timezone": "Europe/Berlin",
        "jitter": "5s",
        "grace": "10m",
    }
    assert job["paused"] is True
    assert job["next_run"] is None


def test_list_table_and_json(cli: Cli, prefix: str) -> None:
    cli.fast_ok("add", f"{prefix}.beat", "30s")
    cli.fast_ok("add", f"{prefix}.weekly", "0 9 * * MON", "--tz", "Europe/Berlin")

    for command in ("list", "ls"):
        table = cli.ok(command).out
        header = table.splitlines()[0]
        for column in ("SUBJECT", "SCHEDULE", "NEXT RUN", "PAUSED"):
            assert column in header, table
        beat = next(line for line in table.splitlines() if line.startswith(f"{prefix}.beat "))
        assert "every 30s" in beat
        assert re.search(r"in \d+s \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ\)", beat), beat
        weekly = next(line for line in table.splitlines() if line.startswith(f"{prefix}.weekly"))
        assert "0 9 * * MON (Europe/Berlin)" in weekly

    data = cli.ok("list", "--json").json()
    assert set(data) == {"jobs"}
    mine = {j["target"]["subject"]: j for j in data["jobs"] if j["target"]["subject"]
            .startswith(prefix + ".")}  # fmt: skip
    assert set(mine) == {f"{prefix}.beat", f"{prefix}.weekly"}
    for job in mine.values():
        assert set(job) >= RUN_STATE, job
        assert job["run_count"] == 0 and job["paused"] is False
        assert datetime.fromisoformat(job["next_run"]) > datetime.now(UTC)
    assert cli.ok("ls", "--json").json()["jobs"]  # the alias speaks JSON too


def test_get_table_and_json(cli: Cli, prefix: str) -> None:
    subject = f"{prefix}.cleanup"
    cli.fast_ok("add", subject, "1h", '{"table":"sessions"}')
    table = cli.ok("get", subject).out
    assert "SUBJECT" in table.splitlines()[0]
    assert subject in table and "every 1h" in table
    assert "payload:" in table and "sessions" in table

    job = get_job(cli, subject)
    assert job["target"] == {"subject": subject}
    assert job["schedule"] == {"every": "1h"}
    assert set(job) >= RUN_STATE


def test_create_from_file_and_stdin(cli: Cli, prefix: str, tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(
        f'{{"target": {{"subject": "{prefix}.file"}}, "schedule": {{"every": "2h"}},'
        f' "payload": {{"type": "text", "data": "hi"}}}}'
    )
    assert cli.ok("create", str(path)).out.strip() == f"created {prefix}.file"
    assert get_job(cli, f"{prefix}.file")["schedule"] == {"every": "2h"}

    flat = f'{{"subject": "{prefix}.stdin", "schedule": {{"cron": "0 3 * * *"}}}}'
    assert cli.ok("create", "-", input=flat).out.strip() == f"created {prefix}.stdin"
    assert get_job(cli, f"{prefix}.stdin")["schedule"]["cron"] == "0 3 * * *"

    # A document read back with `get --json` can be sent again (run state is ignored).
    again = cli.fails(6, "create", "-", input=cli.fast_ok("get", f"{prefix}.file", "--json").out)
    no_success_claim(again.out)
    junk = cli.fails(2, "create", "-", input="{not json")
    assert junk.out == ""
    cli.fails(2, "create", str(tmp_path / "missing.json"))


def test_update_from_args_and_file(cli: Cli, prefix: str, tmp_path: Path) -> None:
    subject = f"{prefix}.report"
    cli.fast_ok("add", subject, "0 9 * * MON", "--tz", "Europe/Berlin")
    out = cli.ok("update", subject, "0 8 * * MON-FRI", "--tz", "Europe/Berlin").out
    assert out.strip() == f"updated {subject}"
    job = get_job(cli, subject)
    assert job["schedule"] == {"cron": "0 8 * * MON-FRI", "timezone": "Europe/Berlin"}
    local = datetime.fromisoformat(job["next_run"]).astimezone(ZoneInfo("Europe/Berlin"))
    assert (local.hour, local.minute) == (8, 0) and local.weekday() < 5

    cli.ok("update", subject, "45s", '{"n": 1}')
    job = get_job(cli, subject)
    assert job["schedule"] == {"every": "45s"}
    assert job["payload"]["type"] == "json"

    # update is an upsert: a subject that did not exist is created
    cli.ok("update", f"{prefix}.new", "10m")
    assert get_job(cli, f"{prefix}.new")["schedule"] == {"every": "10m"}

    path = tmp_path / "doc.json"
    path.write_text(f'{{"target": {{"subject": "{subject}"}}, "schedule": {{"every": "3h"}}}}')
    assert cli.ok("update", "--file", str(path)).out.strip() == f"updated {subject}"
    job = get_job(cli, subject)
    assert job["schedule"] == {"every": "3h"} and "payload" not in job

    doc = f'{{"target": {{"subject": "{subject}"}}, "schedule": {{"every": "4h"}}}}'
    cli.ok("update", "-f", "-", input=doc)
    assert get_job(cli, subject)["schedule"] == {"every": "4h"}


def test_delete_subject_and_a_missing_one(cli: Cli, prefix: str) -> None:
    cli.fast_ok("add", f"{prefix}.a", "1h")
    cli.fast_ok("add", f"{prefix}.b", "1h")
    assert cli.ok("delete", f"{prefix}.a").out.strip() == f"deleted {prefix}.a"
    reply = cli.ok("del", f"{prefix}.b", "--json").json()
    assert reply["status"] == "deleted" and reply["existed"] is True
    assert subjects(cli, prefix) == []
    cli.fails(3, "get", f"{prefix}.a", fast=True)
    # a job that does not exist: nothing deleted, said so, exit 3 (never "deleted ...")
    for command in ("delete", "del"):
        missing = cli.fails(3, command, f"{prefix}.a")
        assert "nothing deleted" in missing.err and f"{prefix}.a" in missing.err
        assert missing.out == ""
    json_missing = cli.fails(3, "delete", f"{prefix}.never", "--json")
    assert json_missing.out == ""
    # ...unless the script says that is fine
    ignored = cli.ok("delete", f"{prefix}.never", "--ignore-not-found")
    assert ignored.out == "" and "nothing deleted" in ignored.err
    data = cli.ok("delete", f"{prefix}.never", "--ignore-not-found", "--json").json()
    assert data["existed"] is False and data["subject"] == f"{prefix}.never"


def test_delete_by_pattern_asks(cli: Cli, prefix: str) -> None:
    mine = [f"{prefix}.r.one", f"{prefix}.r.two", f"{prefix}.r.deep.three"]
    for subject in mine:
        cli.fast_ok("add", subject, "1h")
    cli.fast_ok("add", f"{prefix}.keep", "1h")
    pattern = f"{prefix}.r.>"

    # no input at all: exit 2, nothing deleted; the question and the list go to stderr
    result = cli.fails(2, "delete", pattern, stdin_devnull=True)
    assert "--yes" in result.err
    for subject in mine:
        assert subject in result.err
    assert "3 job(s) match" in result.err
    assert result.out == ""
    assert subjects(cli, prefix) == sorted([*mine, f"{prefix}.keep"])

    # answering n: nothing deleted
    result = cli.ok("delete", pattern, input="n\n")
    assert "Delete them?" in result.err and "nothing deleted" in result.err
    assert result.out == ""
    assert subjects(cli, prefix) == sorted([*mine, f"{prefix}.keep"])

    # `*` matches one token only
    result = cli.ok("delete", f"{prefix}.r.*", input="y\n")
    assert "2 job(s) match" in result.err and f"{prefix}.r.deep.three" not in result.err
    assert result.out.strip() == "deleted 2 job(s)"
    assert subjects(cli, prefix) == sorted([f"{prefix}.r.deep.three", f"{prefix}.keep"])

    # answering y
    result = cli.ok("del", pattern, input="y\n")
    assert "deleted 1 job(s)" in result.out
    assert subjects(cli, prefix) == [f"{prefix}.keep"]

    # --yes skips the question; --json reports what went
    cli.fast_ok("add", f"{prefix}.r.again", "1h")
    reply = cli.ok("delete", pattern, "--yes", "--json", stdin_devnull=True).json()
    assert reply == {"count": 1, "deleted": [f"{prefix}.r.again"]}
    assert subjects(cli, prefix) == [f"{prefix}.keep"]

    # nothing matches: nothing asked, exit 0 (as kubectl's "No resources found")
    result = cli.ok("delete", f"{prefix}.none.>", stdin_devnull=True)
    assert "no job matches" in result.err and result.out == ""


def test_status_table_and_json(cli: Cli, service: Service) -> None:
    table = cli.ok("status").out
    assert re.search(rf"(?m)^leader\s+{re.escape(service.instance_id)}\s*$", table), table
    assert re.search(r"(?m)^epoch\s+\d+", table)
    assert re.search(r"(?m)^jobs\s+\d+", table)

    data = cli.ok("status", "--json").json()
    assert data["is_leader"] is True  # the only instance answers
    assert data["leader"]["instance_id"] == service.instance_id
    assert isinstance(data["leader"]["epoch"], int) and data["leader"]["epoch"] >= 1
    assert isinstance(data["jobs"], int)
    assert data["instance_id"] == service.instance_id
    assert data["version"] == __version__


def test_pause_and_resume(cli: Cli, prefix: str) -> None:
    subject = f"{prefix}.cleanup"
    cli.fast_ok("add", subject, "1h")
    assert cli.ok("pause", subject).out.strip() == f"paused {subject}"
    job = get_job(cli, subject)
    assert job["paused"] is True and job["next_run"] is None
    assert re.search(rf"(?m)^{re.escape(subject)}\s.*\byes\b", cli.ok("get", subject).out)

    assert cli.ok("resume", subject).out.strip() == f"resumed {subject}"
    job = get_job(cli, subject)
    assert job["paused"] is False and job["next_run"] is not None


def test_trigger_then_history(cli: Cli, prefix: str, service: Service) -> None:
    subject = f"{prefix}.beat"
    cli.fast_ok("add", subject, "1h")
    empty = cli.ok("history", subject)
    assert empty.out == "" and empty.err.strip() == f"no runs of {subject} yet"
    assert cli.ok("history", subject, "--json").json()["runs"] == []

    out = cli.ok("trigger", subject).out
    assert out.startswith(f"triggered {subject} (scheduled ")
    first = wait_for_runs(cli, subject, 1)
    reply = cli.ok("trigger", subject, "--json").json()
    assert reply["status"] == "triggered" and reply["scheduled"]
    runs = wait_for_runs(cli, subject, 2)

    data = cli.ok("history", subject, "--json").json()
    assert data["subject"] == subject
    runs = data["runs"]
    assert len(runs) == 2
    assert runs[1]["scheduled"] == first[0]["scheduled"]
    newest, older = (datetime.fromisoformat(r["scheduled"]) for r in runs)
    assert newest > older, "history is newest first"
    assert datetime.fromisoformat(runs[0]["scheduled"]) == datetime.fromisoformat(
        reply["scheduled"]
    )
    for run in runs:
        assert run["subject"] == subject
        assert run["outcome"] == "fired"
        assert run["instance"] == service.instance_id

    assert len(cli.ok("history", subject, "-n", "1", "--json").json()["runs"]) == 1
    table = cli.ok("history", subject).out
    header = table.splitlines()[0]
    for column in ("SCHEDULED", "ACTUAL", "INSTANCE", "EPOCH", "OUTCOME"):
        assert column in header
    rows = [line for line in table.splitlines()[1:] if line.strip()]
    assert len(rows) == 2
    assert all(service.instance_id in row and "fired" in row for row in rows), rows
    assert get_job(cli, subject)["run_count"] == 2


def test_history_reads_are_complete(cli: Cli, prefix: str) -> None:
    """Every read of a job's history returns all its runs, not sometimes none."""
    subject = f"{prefix}.beat"
    cli.fast_ok("add", subject, "1h")
    for _ in range(3):
        cli.fast_ok("trigger", subject)
    wait_for_runs(cli, subject, 3)
    counts = [len(cli.fast_ok("history", subject, "--json").json()["runs"]) for _ in range(100)]
    assert counts == [3] * 100, f"history returned {sorted(set(counts))} runs for 3 recorded"


def test_instances_leader_and_follower(cli: Cli, service: Service) -> None:
    cli.ok("status")  # at least one request handled by the leader before the follower exists
    follower = ServeProcess("cli-main-b", service.env)
    try:
        follower.wait_for("nats-cron instance started", timeout=15)
        data = cli.ok("instances", "--json").json()
        found = data["instances"]
        assert sorted(i["instance_id"] for i in found) == sorted(
            [service.instance_id, follower.instance_id]
        ), found
        roles = {i["instance_id"]: i["role"] for i in found}
        assert roles == {service.instance_id: "leader", follower.instance_id: "follower"}
        assert found[0]["role"] == "leader"  # leader listed first
        for item in found:
            assert item["version"] == __version__
            assert item["id"]
            names = {e["name"] for e in item["endpoints"]}
            assert {"list", "get", "create", "status", "trigger"} <= names, names
            assert all(isinstance(e["num_requests"], int) for e in item["endpoints"])
        leader = next(i for i in found if i["role"] == "leader")
        assert sum(e["num_requests"] for e in leader["endpoints"]) >= 1

        table = cli.ok("instances").out
        header = table.splitlines()[0]
        for column in ("INSTANCE", "ROLE", "REQUESTS"):
            assert column in header
        assert re.search(rf"(?m)^{re.escape(service.instance_id)}\s+leader\b", table), table
        assert re.search(rf"(?m)^{re.escape(follower.instance_id)}\s+follower\b", table), table
    finally:
        follower.stop()


# --- the README's examples ----------------------------------------------------------------


def readme_cli_examples() -> list[str]:
    match = re.search(r"<!-- cli-examples.*?-->\s*```bash\n(.*?)```", README, re.DOTALL)
    assert match, "no cli-examples block in the README"
    lines = [line.strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_cli_examples_run_in_order(tmp_path: Path, xdg: Path) -> None:
    examples = readme_cli_examples()
    assert len(examples) >= 10 and all(line.startswith("nats-cron ") for line in examples)
    own = EmbeddedNatsServer(tmp_path / "js").start()
    try:
        svc = start_service(own, "cli-readme")
        try:
            cli = Cli(cli_env(xdg, own.url))
            work = tmp_path / "work"  # where `> jobs.json` and `-f jobs.json` are
            work.mkdir()
            for line in examples:
                argv = shlex.split(line)
                assert argv[0] == "nats-cron"
                redirect = None
                if len(argv) > 2 and argv[-2] == ">":  # `nats-cron export > jobs.json`
                    argv, redirect = argv[:-2], work / argv[-1]
                result = cli(*argv[1:], stdin_devnull=True, cwd=work)  # python -m nats_cron_cli
                assert result.code == 0, f"README example failed: {line}\n{result}"
                assert "Traceback" not in result.err, str(result)
                if redirect is not None:
                    redirect.write_text(result.out)
            left = cli.ok("list", "--json").json()["jobs"]
            assert [j["target"]["subject"] for j in left] == ["database.cleanup"]
            assert left[0]["paused"] is False
            # jobs as code and a partial update are among them
            assert any(line.startswith("nats-cron export") for line in examples)
            assert any(line.startswith("nats-cron apply -f") for line in examples)
            assert any(line.startswith("nats-cron update ") and "-f" not in line.split()
                       for line in examples)  # fmt: skip
        finally:
            svc.proc.stop()
    finally:
        own.stop()


# --- error paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["status"],
        ["add", "x.y", "30s"],
        ["get", "x.y", "--json"],
        ["delete", "x.>"],
        ["instances"],
        ["instances", "--json"],
    ],
    ids=lambda a: "-".join(a),
)
def test_no_server_exits_4_fast(offline: Cli, args: list[str]) -> None:
    result = offline.fails(4, *args, stdin_devnull=True)
    assert result.elapsed < 3, str(result)
    assert "cannot connect" in result.err
    assert result.out == ""


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["status"],
        ["status", "--json"],
        ["add", "x.y", "30s"],
        ["trigger", "x.y"],
        ["instances"],
        ["instances", "--json"],
    ],
    ids=lambda a: "-".join(a),
)
def test_no_responders_exits_4(
    empty_server: EmbeddedNatsServer, xdg: Path, args: list[str]
) -> None:
    cli = Cli(cli_env(xdg, empty_server.url))
    result = cli.fails(4, *args)
    assert "no nats-cron instance" in result.err
    assert result.out == ""
    assert result.elapsed < 4, str(result)


@pytest.mark.parametrize("command", ["get", "pause", "resume", "trigger", "history"])
def test_unknown_job_exits_3(cli: Cli, prefix: str, command: str) -> None:
    result = cli.fails(3, command, f"{prefix}.missing")
    assert f"{prefix}.missing" in result.err
    assert result.out == ""


def test_invalid_schedule_exits_2(cli: Cli, prefix: str) -> None:
    result = cli.fails(2, "add", f"{prefix}.y", "1d")
    assert 'schedule.every: "1d": unknown unit "d"' in result.err
    assert result.out == ""
    cli.fails(2, "add", f"{prefix}.y", "61 * * * *", fast=True)
    cli.fails(2, "add", f"{prefix}.y", "0 9 * * *", "--tz", "Mars/Base", fast=True)
    cli.fails(2, "add", f"{prefix}.*", "1h", fast=True)
    cli.fails(2, "update", f"{prefix}.y", "0s", fast=True)
    assert subjects(cli, prefix) == []


def test_duplicate_add_exits_6(cli: Cli, prefix: str) -> None:
    cli.fast_ok("add", f"{prefix}.dup", "1h")
    result = cli.fails(6, "add", f"{prefix}.dup", "2h")
    assert f"{prefix}.dup" in result.err
    assert result.out == ""
    assert get_job(cli, f"{prefix}.dup")["schedule"] == {"every": "1h"}


def test_update_needs_arguments_or_file(cli: Cli, prefix: str, tmp_path: Path) -> None:
    result = cli.fails(2, "update")
    assert "--file" in result.err and result.out == ""
    cli.fails(2, "update", f"{prefix}.only-subject", fast=True)
    path = tmp_path / "doc.json"
    path.write_text(f'{{"target": {{"subject": "{prefix}.x"}}, "schedule": {{"every": "1h"}}}}')
    both = cli.fails(2, "update", f"{prefix}.x", "1h", "--file", str(path))
    assert both.out == ""
    assert subjects(cli, prefix) == []


def test_silent_server_times_out_with_4(offline: Cli) -> None:
    """Something accepts TCP but never speaks NATS: exit 4 after --timeout, not a hang."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"nats://127.0.0.1:{listener.getsockname()[1]}"
        result = offline.fails(4, "status", "--server", url, "--timeout", "1")
    assert "no answer within 1s" in result.err
    assert result.out == ""
    assert 0.9 < result.elapsed < 4, str(result)


def test_timeout_must_be_positive(offline: Cli) -> None:
    offline.fails(2, "list", "--timeout", "0")


AUTH_CONF = """
authorization {
  users = [
    {user: admin, password: adminpw}
    {user: reader, password: readerpw, permissions: {
      publish: {allow: ["nats-cron.jobs.list", "nats-cron.jobs.get", "nats-cron.status",
                        "$JS.API.>", "_INBOX.>"]}
      subscribe: {allow: ["_INBOX.>"]}
    }}
  ]
}
"""


@pytest.fixture(scope="module")
def auth_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    base = tmp_path_factory.mktemp("cli-auth")
    conf = base / "auth.conf"
    conf.write_text(AUTH_CONF)
    srv = EmbeddedNatsServer(base / "js", config_file=conf).start()
    try:
        svc = start_service(srv, "cli-auth", NATS_USER="admin", NATS_PASSWORD="adminpw")
        try:
            yield svc
        finally:
            svc.proc.stop()
    finally:
        srv.stop()


def test_permission_denied_exits_5(auth_service: Service, xdg: Path) -> None:
    cli = Cli(cli_env(xdg, auth_service.url))
    reader = ["--user", "reader", "--password", "readerpw"]

    listed = cli.ok("list", *reader)
    assert listed.out == "" and listed.err.strip() == "no jobs"
    assert cli.ok("status", "--json", *reader).json()["leader"]["instance_id"] == (
        auth_service.instance_id
    )

    result = cli.fails(5, "add", "perm.job", "30s", *reader, "--timeout", "10")
    assert "permission denied" in result.err
    assert "nats-cron.jobs.create" in result.err
    assert result.out == ""
    assert result.elapsed < 3, f"denial must not wait for the timeout: {result}"

    # credentials in the URL: same code, and the password is not shown
    url = auth_service.url.replace("nats://", "nats://reader:readerpw@")
    in_url = cli.fails(5, "pause", "perm.job", "--server", url, "--timeout", "10")
    assert "permission denied" in in_url.err and in_url.elapsed < 3

    # credentials from the environment
    env = cli_env(xdg, auth_service.url, NATS_USER="reader", NATS_PASSWORD="readerpw")
    cli.fails(5, "trigger", "perm.job", env=env)
    assert cli.ok("list", "--json", env=env).json() == {"jobs": []}

    for run in cli.history:
        assert "readerpw" not in run.out and "readerpw" not in run.err, str(run)

    # the admin may: the job was never created by the reader
    admin = ["--user", "admin", "--password", "adminpw"]
    cli.fails(3, "get", "perm.job", *admin)


def test_permission_denied_discovery_exits_5_cleanly(auth_service: Service, xdg: Path) -> None:
    cli = Cli(cli_env(xdg, auth_service.url))
    result = cli.fails(5, "instances", "--user", "reader", "--password", "readerpw")
    assert "permission denied" in result.err
    assert result.out == ""
    assert "readerpw" not in result.err


def test_wrong_password_fails_without_leaking_it(auth_service: Service, xdg: Path) -> None:
    cli = Cli(cli_env(xdg, auth_service.url))
    result = cli("list", "--user", "reader", "--password", "s3cret-wrong")
    assert result.code in (4, 5), str(result)
    assert result.err.startswith("error: ") and "Traceback" not in result.err
    assert "s3cret-wrong" not in result.err + result.out
    assert result.elapsed < 3


# --- nats CLI contexts --------------------------------------------------------------------


def write_context(xdg: Path, name: str, **fields: str) -> None:
    folder = xdg / "nats" / "context"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(fields))


def select_context(xdg: Path, name: str) -> None:
    (xdg / "nats" / "context.txt").write_text(name + "\n")


def test_context_flag(service: Service, xdg: Path) -> None:
    write_context(xdg, "test", url=service.url, description="the test server")
    cli = Cli(cli_env(xdg, None))  # no NATS_URL
    table = cli.ok("status", "--context", "test").out
    assert re.search(rf"(?m)^leader\s+{re.escape(service.instance_id)}\b", table), table
    data = cli.ok("status", "--context", "test", "--json").json()
    assert data["leader"]["instance_id"] == service.instance_id


def test_unknown_context_exits_2(service: Service, xdg: Path) -> None:
    write_context(xdg, "test", url=service.url)
    cli = Cli(cli_env(xdg, None))
    result = cli.fails(2, "status", "--context", "nope")
    assert "context" in result.err and "nope" in result.err
    assert result.out == ""
    assert result.elapsed < 3
    cli.fails(2, "list", "--context", "../etc")


def test_selected_context_is_used_without_url_or_flag(service: Service, xdg: Path) -> None:
    write_context(xdg, "test", url=service.url)
    write_context(xdg, "dead", url=closed_port_url())
    select_context(xdg, "test")
    cli = Cli(cli_env(xdg, None))
    assert cli.ok("status", "--json").json()["leader"]["instance_id"] == service.instance_id

    # --context beats the selection; NATS_URL beats the selection; --server beats a context
    select_context(xdg, "dead")
    cli.fails(4, "status")
    cli.ok("status", "--context", "test")
    cli.ok("status", env=cli_env(xdg, service.url))
    cli.ok("status", "--context", "dead", "--server", service.url)

    # credentials in a context's URL are never shown
    write_context(xdg, "secret", url=closed_port_url().replace("//", "//u:s3cr3t-pw@"))
    leak = cli.fails(4, "status", "--context", "secret")
    assert "s3cr3t-pw" not in leak.err + leak.out and "***@" in leak.err

    # a selected context that does not exist is an error, not a silent fallback
    select_context(xdg, "gone")
    cli.fails(2, "status")


# --- connection options as the nats CLI has them (issue 13) --------------------------------


def test_connection_options_before_or_after_the_command(service: Service, xdg: Path) -> None:
    cli = Cli(cli_env(xdg, None))  # no NATS_URL: only the flags say where
    before = cli.ok("-s", service.url, "status", "--json").json()
    after = cli.ok("status", "--json", "-s", service.url).json()
    assert before["instance_id"] == after["instance_id"] == service.instance_id
    cli.ok("--server", service.url, "--timeout", "2s", "list")
    # after the command wins over before it
    cli.ok("-s", closed_port_url(), "status", "-s", service.url)
    dead = cli.fails(4, "-s", service.url, "status", "-s", closed_port_url())
    assert "cannot connect" in dead.err


def test_connection_options_are_listed_once_on_the_root(offline: Cli) -> None:
    root = offline.ok("--help").out
    for flag in ("--server", "--context", "--creds", "--tlsca", "--tlscert", "--tlskey",
                 "--timeout"):  # fmt: skip
        assert flag in root, root
    for command in ("list", "add", "update", "serve"):
        text = offline.ok(command, "--help").out
        assert "--server" not in text.replace("--server/-s", ""), text
        assert "--creds <" not in text and "--tlsca <" not in text, text
        assert "go before or after the command" in " ".join(text.split())


@pytest.mark.parametrize(
    ("timeout", "seconds"), [("1", 1.0), ("1s", 1.0), ("1500ms", 1.5), ("0.5", 0.5)]
)
def test_timeout_takes_seconds_or_a_duration(offline: Cli, timeout: str, seconds: float) -> None:
    with socket.socket() as listener:  # accepts TCP, never speaks NATS
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"nats://127.0.0.1:{listener.getsockname()[1]}"
        by_flag = offline.fails(4, "status", "--server", url, "--timeout", timeout)
        by_env = offline.fails(4, "status", "--server", url,
                               env={**offline.env, "NATS_TIMEOUT": timeout})  # fmt: skip
    for result in (by_flag, by_env):
        assert f"no answer within {seconds:g}s" in result.err, str(result)
        assert seconds * 0.9 < result.elapsed < seconds + 3, str(result)


@pytest.mark.parametrize("timeout", ["2x", "-1s", "0s", "soon"])
def test_a_bad_timeout_exits_2(offline: Cli, timeout: str) -> None:
    result = offline.fails(2, "list", "--timeout", timeout)
    assert "--timeout" in result.err
    env_result = offline.fails(2, "list", env={**offline.env, "NATS_TIMEOUT": timeout})
    assert "NATS_TIMEOUT" in env_result.err


def test_nats_context_variable_and_context_files(service: Service, xdg: Path, tmp_path: Path):
    write_context(xdg, "test", url=service.url)
    env = cli_env(xdg, None, NATS_CONTEXT="test")
    cli = Cli(env)
    assert cli.ok("status", "--json").json()["instance_id"] == service.instance_id
    cli.fails(2, "status", env={**env, "NATS_CONTEXT": "nope"})
    # a context file by path, as `nats --context ./ctx.json`
    path = tmp_path / "elsewhere.json"
    path.write_text(json.dumps({"url": service.url}))
    plain = Cli(cli_env(xdg, None))
    assert plain.ok("--context", str(path), "status", "--json").json()["jobs"] >= 0


def test_serve_takes_a_context(server: EmbeddedNatsServer, xdg: Path) -> None:
    write_context(xdg, "local", url=server.url)
    env = service_env("", "cli-ctx", XDG_CONFIG_HOME=str(xdg))
    env["NATS_URL"] = ""
    proc = ServeProcess("cli-ctx-a", env, args=["--context", "local"])
    try:
        proc.wait_for("nats-cron instance started", timeout=15)
    finally:
        proc.stop()
    with_env = ServeProcess("cli-ctx-b", {**env, "NATS_CONTEXT": "local"})
    try:
        with_env.wait_for("nats-cron instance started", timeout=15)
    finally:
        with_env.stop()
    missing = ServeProcess("cli-ctx-c", env, args=["--context", "missing"])
    try:
        assert missing.proc.wait(15) == 2
    finally:
        missing.stop()
    assert "unknown context 'missing'" in "".join(missing.raw)


# --- update changes only what it is told ---------------------------------------------------


def test_update_keeps_what_it_was_not_told(cli: Cli, prefix: str) -> None:
    subject = f"{prefix}.cleanup"
    cli.fast_ok("add", subject, "1h", '{"table":"sessions"}', "--paused", "--jitter", "5s",
                "--grace", "10m")  # fmt: skip
    out = cli.ok("update", subject, "0 3 * * *", "--tz", "Europe/Berlin").out
    assert out.strip() == f"updated {subject}"
    job = get_job(cli, subject)
    assert job["schedule"] == {"cron": "0 3 * * *", "timezone": "Europe/Berlin",
                               "jitter": "5s", "grace": "10m"}  # fmt: skip
    assert job["payload"] == {"type": "json", "data": '{"table":"sessions"}'}
    assert job["paused"] is True and job["next_run"] is None

    # an interval drops the zone (it would have no effect), keeps the rest
    cli.ok("update", subject, "2h")
    job = get_job(cli, subject)
    assert job["schedule"] == {"every": "2h", "jitter": "5s", "grace": "10m"}
    assert job["payload"]["data"] == '{"table":"sessions"}' and job["paused"] is True

    # what is given changes
    cli.ok("update", subject, "2h", "plain words", "--resumed", "--jitter", "0s")
    job = get_job(cli, subject)
    assert job["payload"] == {"type": "text", "data": "plain words"}
    assert job["paused"] is False and job["next_run"] is not None
    assert "jitter" not in job["schedule"] and job["schedule"]["grace"] == "10m"
    # the kept data is not base64: refused by the service, nothing changed
    cli.fails(2, "update", subject, "@every 3h", "--payload-type", "base64", "--paused")
    cli.ok("update", subject, "@every 3h", "--paused")
    job = get_job(cli, subject)
    assert job["schedule"]["every"] == "3h" and job["paused"] is True
    assert job["payload"] == {"type": "text", "data": "plain words"}


def test_update_json_and_revision_precondition(cli: Cli, prefix: str) -> None:
    subject = f"{prefix}.rev"
    added = cli.ok("add", subject, "1h", "--json").json()
    assert added["status"] == "created" and added["revision"] > 0
    revision = get_job(cli, subject)["revision"]
    assert revision == added["revision"]
    assert f"revision: {revision}" in cli.ok("get", subject).out

    stale = cli.fails(6, "update", subject, "2h", "--revision", str(revision - 1))
    assert "nothing updated" in stale.err and stale.out == ""
    assert get_job(cli, subject)["schedule"] == {"every": "1h"}
    reply = cli.ok("update", subject, "2h", "--revision", str(revision), "--json").json()
    assert reply["status"] == "updated" and reply["revision"] > revision
    cli.fails(6, "update", subject, "3h", "--revision", "0")  # 0: only if new
    cli.fails(3, "update", f"{prefix}.none", "3h", "--revision", "4")
    created = cli.ok("update", f"{prefix}.new", "3h", "--revision", "0").out
    assert created.strip() == f"created {prefix}.new"

    # --file: a read-back document's revision is checked
    doc = get_job(cli, subject)
    doc["schedule"] = {"every": "4h"}
    cli.ok("update", "-f", "-", input=json.dumps(doc))
    conflict = cli.fails(6, "update", "-f", "-", input=json.dumps(doc))
    assert "changed" in conflict.err
    del doc["revision"]  # without it, the file replaces whatever is there
    cli.ok("update", "-f", "-", input=json.dumps(doc))


def test_update_is_redone_over_a_concurrent_writer(cli: Cli, prefix: str) -> None:
    """Every fire of an every-1s job writes its record (a new revision each second):
    a partial update still lands, on top of it, and keeps the payload."""
    subject = f"{prefix}.busy"
    cli.fast_ok("add", subject, "1s", '{"keep": true}')
    wait_for_runs(cli, subject, 2)
    for every in ("2s", "1s", "2s"):
        cli.ok("update", subject, every)
        job = get_job(cli, subject)
        assert job["schedule"] == {"every": every}
        assert job["payload"] == {"type": "json", "data": '{"keep": true}'}


# --- dry runs and --json on every command that changes jobs --------------------------------


def test_dry_run_on_every_change(cli: Cli, prefix: str, tmp_path: Path) -> None:
    subject = f"{prefix}.dry"
    assert cli.ok("add", subject, "1h", "--dry-run").out.strip() == f"added {subject} (dry run)"
    cli.fails(3, "get", subject, fast=True)
    bad = cli.fails(2, "add", subject, "1d", "--dry-run")
    assert 'unknown unit "d"' in bad.err

    path = tmp_path / "job.json"
    path.write_text(json.dumps({"target": {"subject": subject}, "schedule": {"every": "2h"}}))
    assert cli.ok("create", str(path), "--dry-run", "--json").json()["dry_run"] is True
    cli.fails(3, "get", subject, fast=True)

    cli.fast_ok("add", subject, "1h")
    before = get_job(cli, subject)
    for args in (
        ["update", subject, "5m", "--dry-run"],
        ["update", "-f", str(path), "--dry-run"],
        ["pause", subject, "--dry-run"],
        ["trigger", subject, "--dry-run"],
        ["delete", subject, "--dry-run"],
        ["delete", f"{prefix}.>", "--dry-run"],
    ):
        result = cli.ok(*args)
        assert "(dry run)" in result.out, str(result)
    cli.ok("pause", subject)
    cli.ok("resume", subject, "--dry-run")
    assert get_job(cli, subject)["paused"] is True
    cli.ok("resume", subject)
    after = get_job(cli, subject)
    assert after["schedule"] == before["schedule"]
    assert cli.ok("history", subject, "--json").json()["runs"] == []
    cli.fails(3, "pause", f"{prefix}.missing", "--dry-run")


def test_json_on_every_change(cli: Cli, prefix: str, tmp_path: Path) -> None:
    subject = f"{prefix}.js"
    assert cli.ok("add", subject, "1h", "--json").json()["status"] == "created"
    assert cli.ok("update", subject, "2h", "--json").json()["status"] == "updated"
    assert cli.ok("pause", subject, "--json").json()["status"] == "paused"
    assert cli.ok("resume", subject, "--json").json()["status"] == "resumed"
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"target": {"subject": f"{prefix}.c"}, "schedule": {"every": "1h"}}))
    created = cli.ok("create", str(path), "--json").json()
    assert created["status"] == "created" and created["subject"] == f"{prefix}.c"
    assert cli.ok("delete", subject, "--json").json()["existed"] is True


# --- list PATTERN, trigger --force, schedule rules -----------------------------------------


def test_list_pattern(cli: Cli, prefix: str) -> None:
    for name in ("r.daily", "r.weekly", "r.deep.one", "other"):
        cli.fast_ok("add", f"{prefix}.{name}", "1h")
    data = cli.ok("list", f"{prefix}.r.*", "--json").json()
    assert [j["target"]["subject"] for j in data["jobs"]] == [f"{prefix}.r.daily",
                                                             f"{prefix}.r.weekly"]  # fmt: skip
    table = cli.ok("list", f"{prefix}.r.>").out
    assert f"{prefix}.r.deep.one" in table and f"{prefix}.other" not in table
    none = cli.ok("list", f"{prefix}.none.>")
    assert none.out == "" and "no job matches" in none.err
    cli.fails(2, "list", f"{prefix}..x")


def test_trigger_a_paused_job(cli: Cli, prefix: str) -> None:
    subject = f"{prefix}.suspended"
    cli.fast_ok("add", subject, "1h", "--paused")
    refused = cli.fails(6, "trigger", subject)
    assert "paused" in refused.err and "--force" in refused.err
    assert refused.out == ""
    out = cli.ok("trigger", subject, "--force").out
    assert out.startswith(f"triggered {subject}")
    runs = wait_for_runs(cli, subject, 1)
    assert runs[0]["outcome"] == "fired"
    job = get_job(cli, subject)
    assert job["paused"] is True and job["next_run"] is None


def test_schedule_rules_of_the_short_form(cli: Cli, prefix: str) -> None:
    zoned = cli.fails(2, "add", f"{prefix}.z", "30s", "--tz", "Europe/Berlin")
    assert "schedule.timezone" in zoned.err and "no effect" in zoned.err
    cli.ok("add", f"{prefix}.robfig", "@every 5m")
    assert get_job(cli, f"{prefix}.robfig")["schedule"] == {"every": "5m"}
    table = cli.ok("next", "@every 90m", "-n", "2", "--json").json()
    assert len(table["next"]) == 2 and table["schedule"] == {"every": "90m"}


# --- a table on an 80-column terminal -------------------------------------------------------


def run_on_terminal(cli: Cli, *args: str, columns: int = 80) -> str:
    """Run the CLI with stdout on a pseudo-terminal of `columns` columns; its output."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in cli.env.items() if k != "COLUMNS"}
    proc = subprocess.Popen([*CLI, *args], env=env, stdout=child, stderr=subprocess.PIPE)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    return re.sub(r"\x1b\[[0-9;]*m", "", b"".join(chunks).decode())


def test_a_narrow_terminal_never_breaks_a_subject(cli: Cli, prefix: str) -> None:
    long_subjects = [f"{prefix}.database.cleanup-of-sessions", f"{prefix}.reports.weekly-summary"]
    for subject in long_subjects:
        cli.fast_ok("add", subject, "0 9 * * MON-FRI", "--tz", "America/New_York")
    cli.fast_ok("pause", long_subjects[0])
    out = run_on_terminal(cli, "list", f"{prefix}.>")
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), out
    for subject in long_subjects:
        assert any(line.startswith(subject + " ") for line in lines), out
    assert any(line.startswith("SUBJECT ") for line in lines), out
