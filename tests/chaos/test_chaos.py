"""The short chaos run (CI): one fault of each kind per topology, about a minute each.

The long run is `python -m tests.chaos --minutes 5 --topology both`. What is counted and
why the bar is what it is: `tests.chaos.analysis`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.chaos.analysis import Report, Seen, analyse
from tests.chaos.harness import KINDS, ChaosConfig, run_chaos


@pytest.mark.chaos
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("topology", "shards"), [("single", 1), ("cluster", 1), ("single", 12)])
async def test_chaos_short(topology: str, shards: int, tmp_path: Path) -> None:
    # Faults at 2, 10, 18 and 26 s: one of each kind, then 8 s to settle. With shards, each
    # fault hits the instance leading the most of them.
    config = ChaosConfig(topology=topology, seconds=32, fault_every=8, shards=shards)
    workdir = tmp_path / "chaos"
    report = await run_chaos(config, workdir)
    table = report.table()
    print(table)
    failures = report.failures()
    if failures:
        # pytest keeps only its last few temporary directories: keep the evidence.
        kept = Path(tempfile.gettempdir()) / f"nats-cron-chaos-failed-{report.run_id}"
        shutil.copytree(workdir, kept, dirs_exist_ok=True)
        evidence = {k: report.examples.get(k) for k in ("missed", "lost", "duplicated_stream")}
        table += f"\nevidence: {json.dumps(evidence)}\nlogs and observations: {kept}"
    assert report.faults_by_kind() == dict.fromkeys(KINDS[topology], 1), table
    assert not failures, table


# --- the analysis itself, on made-up observations ---------------------------------------------


def _fires(job: str, slots: list[int], epoch: int, late: float = 0.005) -> list[Seen]:
    return [Seen(job, ms, epoch, f"e{epoch}", ms / 1000 + late) for ms in slots]


def _analyse(core: list[Seen], wins: dict[int, float], cutoff_ms: int) -> Report:
    report = Report("made-up", 1, 10)
    stream = [Seen(s.job, s.slot_ms, s.epoch, s.instance, s.at, "stream") for s in core]
    analyse(report, sorted({s.job for s in core}), core, stream, wins, cutoff_ms)
    return report


def test_analysis_counts_a_caught_up_gap() -> None:
    # Leader 1 fires 0..3 s, dies; leader 2 wins at 6.2 s, fires slot 6 late, then on time.
    core = _fires("job0", [0, 1000, 2000, 3000], 1)
    core += [Seen("job0", 6000, 2, "e2", 6.25)]
    core += _fires("job0", [7000, 8000, 9000], 2)
    report = _analyse(core, {2: 6.2}, 9000)
    assert (report.gaps, report.caught_up, report.missed) == (1, 1, 0)
    assert report.skipped_slots == 2 and report.slots_expected == 10
    assert report.duplicated_stream == 0 and not report.failures()


def test_analysis_flags_a_skipped_latest_slot_and_a_lost_job() -> None:
    # Leader 2 takes over at 6.2 s (job1 catches up then), but job0's next fire is slot 7,
    # on time: job0's latest missed slot, 6, was skipped.
    core = _fires("job0", [0, 1000, 2000, 3000], 1) + _fires("job0", [7000, 8000], 2)
    core += [*_fires("job1", [500, 1500, 2500], 1), Seen("job1", 5500, 2, "e2", 6.2)]
    core += _fires("job1", [6500, 7500, 8500, 9500], 2)
    report = _analyse(core, {2: 6.2}, 9600)
    assert (report.gaps, report.caught_up, report.missed_gaps) == (3, 1, 1)
    assert report.lost_jobs == ["job0"]  # nothing after 8 s
    assert len(report.failures()) == 2


def test_analysis_counts_duplicates_phase_and_epoch_order() -> None:
    core = _fires("job0", [0, 1000, 2000], 2) + _fires("job0", [1000], 1)  # a deposed leader
    core += [Seen("job0", 2500, 2, "e2", 2.5)]  # off the job's phase
    report = Report("made-up", 1, 10)
    analyse(report, ["job0"], core, core, {}, 2600)
    assert report.duplicated_core == 1 and report.duplicated_stream == 1
    assert report.epoch_order_violations == 1
    assert report.phase_violations == 1


def test_a_slot_fired_twice_by_one_term_fails_the_run() -> None:
    core = _fires("job0", [0, 1000, 2000], 1) + _fires("job0", [1000], 1, late=0.05)
    stream = [Seen(s.job, s.slot_ms, s.epoch, s.instance, s.at, "stream") for s in core[:3]]
    report = Report("made-up", 1, 10)
    analyse(report, ["job0"], core, stream, {}, 2000)
    assert report.duplicated_core == 1 and report.duplicated_core_same_epoch == 1
    assert report.duplicated_stream == 0
    assert report.failures() == ["1 slots fired twice by one leader term"]
