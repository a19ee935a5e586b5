"""Jobs as code with the real CLI against a real service: `export` writes every job as
one stable document, `apply -f FILE` takes it back (idempotent, `--prune`, `--dry-run`,
`--json`, all documents validated before anything changes), fast enough for 10,000 jobs,
with a progress bar on a terminal.
"""

from __future__ import annotations

import itertools
import json
import os
import pty
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nats_apscheduler.embedded import EmbeddedNatsServer
from tests.helpers.cli_run import CLI, Cli, Service, cli_env, start_service

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    server = EmbeddedNatsServer(tmp_path_factory.mktemp("files-js")).start()
    try:
        svc = start_service(server, "cli-files")
        try:
            yield svc
        finally:
            svc.proc.stop()
    finally:
        server.stop()


@pytest.fixture
def cli(service: Service, tmp_path: Path) -> Cli:
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    return Cli(cli_env(xdg, service.url))


@pytest.fixture
def prefix() -> str:
    return f"files{next(_prefixes)}"


def doc(subject: str, every: str = "1h", **extra: Any) -> dict[str, Any]:
    return {"target": {"subject": subject}, "schedule": {"every": every}, **extra}


def write(path: Path, jobs: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps({"jobs": jobs}))
    return str(path)


def exported(cli: Cli, pattern: str) -> dict[str, Any]:
    data: dict[str, Any] = cli.ok("export", pattern).json()
    return data


def test_export_is_stable_and_apply_takes_it_back(cli: Cli, prefix: str, tmp_path: Path):
    cli.ok("add", f"{prefix}.cleanup", "1h", '{"table":"sessions"}', "--jitter", "5s")
    cli.ok("add", f"{prefix}.report", "0 9 * * MON", "--tz", "Europe/Berlin", "--paused")
    cli.ok("trigger", f"{prefix}.cleanup")  # run state must not appear in the export
    first = cli.ok("export", f"{prefix}.>").out
    assert cli.ok("export", f"{prefix}.>").out == first  # stable
    data = json.loads(first)
    assert [j["target"]["subject"] for j in data["jobs"]] == [
        f"{prefix}.cleanup",
        f"{prefix}.report",
    ]
    for job in data["jobs"]:
        assert set(job) <= {"target", "payload", "schedule", "paused"}, job
    assert data["jobs"][1] == {
        "target": {"subject": f"{prefix}.report"},
        "schedule": {"cron": "0 9 * * MON", "timezone": "Europe/Berlin"},
        "paused": True,
    }

    path = tmp_path / "jobs.json"
    path.write_text(first)
    again = cli.ok("apply", "-f", str(path))
    assert again.out == ""  # nothing created, changed or deleted
    assert "0 created, 0 changed, 0 deleted, 2 unchanged" in again.err

    # deleted, then restored from the export (a backup)
    cli.ok("delete", f"{prefix}.>", "--yes")
    restored = cli.ok("apply", "-f", str(path))
    assert restored.out.splitlines() == [f"created {prefix}.cleanup", f"created {prefix}.report"]
    assert exported(cli, f"{prefix}.>") == data
    assert cli.ok("get", f"{prefix}.report", "--json").json()["next_run"] is None  # paused

    # -o FILE
    out = tmp_path / "out.json"
    cli.ok("export", f"{prefix}.>", "-o", str(out))
    assert json.loads(out.read_text()) == data


def test_apply_creates_changes_prunes_and_reports(cli: Cli, prefix: str, tmp_path: Path):
    cli.ok("add", f"{prefix}.keep", "1h")
    cli.ok("add", f"{prefix}.change", "1h")
    cli.ok("add", f"{prefix}.stray", "1h")
    keep_revision = cli.ok("get", f"{prefix}.keep", "--json").json()["revision"]
    jobs = [
        doc(f"{prefix}.keep"),
        doc(f"{prefix}.change", "2h", payload={"type": "text", "data": "new"}),
        doc(f"{prefix}.new", "30m"),
    ]
    path = write(tmp_path / "jobs.json", jobs)

    plan = cli.ok("apply", "-f", path, "--dry-run", "--json").json()
    assert plan == {
        "created": [f"{prefix}.new"],
        "changed": [f"{prefix}.change"],
        "deleted": [],
        "unchanged": [f"{prefix}.keep"],
        "failed": [],
        "dry_run": True,
    }
    assert cli("get", f"{prefix}.new").code == 3  # a dry run stores nothing
    assert cli.ok("get", f"{prefix}.change", "--json").json()["schedule"] == {"every": "1h"}

    result = cli.ok("apply", "-f", path)
    assert result.out.splitlines() == [f"created {prefix}.new", f"changed {prefix}.change"]
    assert "1 created, 1 changed, 0 deleted, 1 unchanged" in result.err
    changed = cli.ok("get", f"{prefix}.change", "--json").json()
    assert changed["schedule"] == {"every": "2h"} and changed["payload"]["data"] == "new"
    # an unchanged job is not even written
    assert cli.ok("get", f"{prefix}.keep", "--json").json()["revision"] == keep_revision

    # --prune: every job the file does not name goes (other tests' jobs too: hence a dry
    # run here, and the real prune below with a file of every job but one)
    pruned_plan = cli.ok("apply", "-f", path, "--prune", "--dry-run", "--json").json()
    assert f"{prefix}.stray" in pruned_plan["deleted"]
    assert cli.ok("get", f"{prefix}.stray", "--json")
    everything = cli.ok("export").json()["jobs"]  # apply with --prune a file of all jobs...
    everything = [j for j in everything if j["target"]["subject"] != f"{prefix}.stray"]
    all_path = write(tmp_path / "all.json", everything)
    pruned = cli.ok("apply", "-f", all_path, "--prune", "--json").json()
    assert pruned["deleted"] == [f"{prefix}.stray"] and pruned["dry_run"] is False
    assert cli("get", f"{prefix}.stray").code == 3

    # idempotent
    twice = cli.ok("apply", "-f", all_path, "--prune", "--json").json()
    assert twice["created"] == twice["changed"] == twice["deleted"] == []


def test_list_json_output_can_be_applied(cli: Cli, prefix: str, tmp_path: Path):
    cli.ok("add", f"{prefix}.a", "1h", "hello")
    listed = cli.ok("list", f"{prefix}.>", "--json").out  # with run state and revisions
    cli.ok("delete", f"{prefix}.a")
    (tmp_path / "listed.json").write_text(listed)
    assert cli.ok("apply", "-f", str(tmp_path / "listed.json")).out.strip() == f"created {prefix}.a"
    assert cli.ok("get", f"{prefix}.a", "--json").json()["payload"]["data"] == "hello"
    # a bare array of documents and stdin work too
    cli.ok("apply", "-f", "-", input=json.dumps([doc(f"{prefix}.b")]))
    assert cli.ok("get", f"{prefix}.b", "--json").json()["schedule"] == {"every": "1h"}


def test_a_bad_file_changes_nothing(cli: Cli, prefix: str, tmp_path: Path):
    good = doc(f"{prefix}.good")
    cases = {
        "offline": [good, doc(f"{prefix}.bad", "1d"), {"target": {"subject": "a b"}}],
        "duplicate": [good, doc(f"{prefix}.good", "2h")],
        # valid offline, refused by the service: below its minimum interval (1s)
        "service": [good, doc(f"{prefix}.fast", "200ms")],
    }
    for name, jobs in cases.items():
        result = cli.fails(2, "apply", "-f", write(tmp_path / f"{name}.json", jobs))
        assert result.out == ""
        assert cli("get", f"{prefix}.good").code == 3, f"{name}: applied anyway"
    offline = cli("apply", "-f", str(tmp_path / "offline.json"))
    assert 'jobs[1]: schedule.every: "1d"' in offline.err and "jobs[2]" in offline.err
    assert "jobs[1]" in cli("apply", "-f", str(tmp_path / "duplicate.json")).err
    assert "minimum interval" in cli("apply", "-f", str(tmp_path / "service.json")).err
    cli.fails(2, "apply", "-f", str(tmp_path / "nope.json"))
    (tmp_path / "shape.json").write_text('{"job": []}')
    cli.fails(2, "apply", "-f", str(tmp_path / "shape.json"))


def test_ten_thousand_jobs(cli: Cli, tmp_path: Path):
    """A file of 10,000 jobs is applied in a few seconds (batched, pipelined writes), and
    applying it again, or exporting, takes about a second."""
    jobs = [doc(f"bulk.j{i:05}", "1h", payload={"type": "json", "data": json.dumps({"n": i})})
            for i in range(10_000)]  # fmt: skip
    path = write(tmp_path / "bulk.json", jobs)
    created = cli.ok("apply", "-f", path, timeout=120)
    assert "10000 created" in created.err
    again = cli.ok("apply", "-f", path, timeout=60)
    assert "10000 unchanged" in again.err
    export = cli.ok("export", "bulk.>", timeout=60)
    assert len(export.json()["jobs"]) == 10_000
    print(f"10,000 jobs: apply {created.elapsed:.1f} s, again {again.elapsed:.1f} s, "
          f"export {export.elapsed:.1f} s")  # fmt: skip
    assert created.elapsed < 60 and again.elapsed < 20 and export.elapsed < 20
    cli.ok("delete", "bulk.>", "--yes", timeout=60)


def test_a_progress_bar_on_a_terminal(cli: Cli, tmp_path: Path):
    jobs = [doc(f"bar.j{i:04}") for i in range(2_000)]
    path = write(tmp_path / "bar.json", jobs)
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [*CLI, "apply", "-f", path],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=child,
        text=True,
    )
    os.close(child)
    err = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
        elif proc.poll() is not None:
            break
    os.close(main)
    assert proc.wait(30) == 0
    text = err.decode(errors="replace")
    assert "applying" in text and "/2000" in text, text[-2000:]
    assert "2000 created" in text
    # the same on a pipe: no bar
    again = cli.ok("apply", "-f", path)
    assert "applying" not in again.err and "validating" not in again.err
    cli.ok("delete", "bar.>", "--yes")
