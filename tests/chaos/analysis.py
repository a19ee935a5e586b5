"""What a chaos run counts, and the pass bar. Pure functions over what the harness saw.

Observers. Every fire is a core NATS message with `Nats-Msg-Id: <subject>:<scheduled ms>`
and the headers `Nats-Cron-Instance` / `Nats-Cron-Epoch`. The harness sees each fire
through core subscribers on `chaos.<run>.>`, one per NATS node and connected to that node
only, so that whichever node a fault takes down, another still sees what the survivors
route (arrival time = when the callback ran); and through a JetStream stream capturing
the same subjects with a 2 min duplicate window (read back at the end; arrival time =
the server's store timestamp). The stream drops a second copy of a `Nats-Msg-Id` inside
its window, so what it stores is what a JetStream consumer sees.

Definitions (per job = per subject; a slot is one scheduled time, 1 s apart):

- fired: a slot seen by any observer. Each observer alone can miss a message that is
  on the wire while *its own* connection is down (the harness reconnects too when a
  server restarts, and a clustered stream drops messages while it elects a leader), so
  gaps are judged on the union; "delivered" (core) and "stored" (stream) are reported
  separately as well.
- expected slots: the 1 s grid from the job's first observed slot to the cut-off (the
  end of the run minus 2 s, so every counted slot had 2 s to arrive).
- phase: an `every` job is anchored (the harness sets `schedule.start`, spreading the 100
  jobs over the second), so `scheduled ms % 1000` must be the same for all its fires; a
  fire off that grid is a phase violation.
- gap: a run of consecutive expected slots not fired. By design an outage of the leader
  (kill, freeze, partition, NATS restart) skips every missed slot except each job's
  latest one, which the next leader fires once when it takes over (within the grace
  window, 1 h by default). So a gap must be followed by a caught-up fire: the next slot
  arrives more than 0.5 s after its scheduled time, or it was fired under a new epoch
  (leader term) and was already due when that term began firing (its first fire seen,
  + 0.1 s of arrival jitter: a new leader fires every due job at one `now`); else the
  new leader skipped the latest missed slot and merely fired the next one on time.
  An outage shorter than the 1 s interval may leave no gap at all: the late slot just
  fires late.
- missed: gaps not followed by such a caught-up fire, plus lost jobs (a job that never
  fired, or whose slots stop before the cut-off: a trailing gap).
- caught up: gaps followed by a caught-up fire.
- duplicated (core): slots one core subscriber received more than once. This is allowed
  across terms: a leader that dies or freezes (or is cut off) after firing a slot but
  before its next progress mark is stored (at most ~200 ms of fires) leaves that slot to
  the next leader, which fires it again with the same `Nats-Msg-Id` (README "Guarantees":
  at least once per slot). Counted apart: slots fired twice within ONE leader term (same
  epoch), which nothing explains: a term fires each slot once. Must be 0.
- duplicated (stream): slots (and `Nats-Msg-Id`s) stored more than once. Must be 0.
- epoch order: within a job, a slot's epochs may never be lower than those of an earlier
  slot (a deposed leader must not fire after its successor): violations must be 0.
- longest gap: the longest time between the arrivals of two consecutive fired slots of
  one job.
- slow starts: leader terms whose first fire came more than 1 s after their "won the
  lease" line (a leader holding the lease without firing).
- recovery (per fault): from the fault to the first fire of a newer epoch; stale status
  replies: `nats-cron.status` answers (asked before each fault) naming a leader older
  than the one whose fires arrive. Both informational.

Pass bar (`Report.failures`): no slot stored twice in the stream, no slot fired twice by
one leader term, no lost job, every gap caught up, no phase or epoch-order violation, and
no harness-level problem (an instance exiting by itself, an election stuck past its
timeout, a frozen leader that never notices).
"""

from __future__ import annotations

import itertools
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

LATE = 0.5  # seconds: a fire this late is a catch-up, not an on-time fire
# A new leader processes every due job at one `now`, just before its first fire arrives;
# a job's catch-up slot is due by then (the slack covers arrival jitter only).
TAKEOVER_SLACK = 0.1
SLOW_START = 1.0  # seconds from "won the lease" to the term's first fire: worth a note
INTERVAL_MS = 1000


@dataclass(frozen=True)
class Seen:
    """One observed fire."""

    job: str
    slot_ms: int
    epoch: int
    instance: str
    at: float  # wall clock, seconds
    source: str = "core"  # which observer: "core<node>" or "stream"
    shard: int = 0


@dataclass
class Fault:
    kind: str
    target: str
    start: float  # wall clock
    end: float = 0.0
    old_epoch: int = 0
    # With shards: the target instance's shards and their epochs when the fault began;
    # recovery is then the first fire of a newer epoch in every one of them.
    old_epochs: dict[int, int] = field(default_factory=dict)
    recovered_after: float | None = None  # fault start -> first fire of a newer epoch
    note: str = ""


@dataclass
class Gap:
    job: str
    first_ms: int
    slots: int
    next_ms: int | None  # None: trailing (the job stopped firing)
    next_late: float | None = None
    next_epoch: int | None = None
    prev_epoch: int | None = None
    caught_up: bool = False
    reason: str = ""


@dataclass
class Report:
    topology: str
    jobs: int
    seconds: float
    faults: list[Fault] = field(default_factory=list)
    slots_expected: int = 0
    delivered_core: int = 0
    stored_stream: int = 0
    fired: int = 0
    duplicated_core: int = 0
    duplicated_core_same_epoch: int = 0
    duplicated_stream: int = 0
    duplicated_stream_ids: int = 0
    gaps: int = 0
    caught_up: int = 0
    missed_gaps: int = 0
    lost_jobs: list[str] = field(default_factory=list)
    skipped_slots: int = 0
    late_fires: int = 0
    longest_gap: float = 0.0
    longest_gap_job: str = ""
    phase_violations: int = 0
    epoch_order_violations: int = 0
    slow_starts: int = 0
    stale_status: int = 0  # `status` replies naming a leader older than the fires show
    problems: list[str] = field(default_factory=list)  # harness-level: exits, stuck, ...
    examples: dict[str, list[Any]] = field(default_factory=dict)
    workdir: str = ""
    run_id: str = ""

    @property
    def missed(self) -> int:
        return self.missed_gaps + len(self.lost_jobs)

    def faults_by_kind(self) -> dict[str, int]:
        return dict(Counter(f.kind for f in self.faults))

    def recoveries(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = defaultdict(list)
        for fault in self.faults:
            if fault.recovered_after is not None:
                out[fault.kind].append(fault.recovered_after)
        return dict(out)

    def failures(self) -> list[str]:
        """The pass bar: every way this run broke a guarantee (empty if none)."""
        out = list(self.problems)
        if self.duplicated_stream or self.duplicated_stream_ids:
            out.append(f"{self.duplicated_stream} slots stored twice in the stream")
        if self.duplicated_core_same_epoch:
            out.append(f"{self.duplicated_core_same_epoch} slots fired twice by one leader term")
        if self.lost_jobs:
            out.append(f"{len(self.lost_jobs)} jobs lost: {self.lost_jobs[:5]}")
        if self.missed_gaps:
            out.append(f"{self.missed_gaps} gaps not followed by a caught-up fire")
        if self.phase_violations:
            out.append(f"{self.phase_violations} fires off their job's phase")
        if self.epoch_order_violations:
            out.append(f"{self.epoch_order_violations} fires by a deposed leader (epoch order)")
        if self.slots_expected == 0:
            out.append("nothing was expected: the jobs never fired")
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["missed"] = self.missed
        data["faults_by_kind"] = self.faults_by_kind()
        data["failures"] = self.failures()
        return data

    def table(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.faults_by_kind().items()))
        rows = [
            ("faults injected", f"{len(self.faults)}", kinds),
            ("slots expected", f"{self.slots_expected}", f"{self.jobs} jobs every 1s"),
            ("delivered (core)", f"{self.delivered_core}", "distinct slots, core subscriber"),
            ("stored (stream)", f"{self.stored_stream}", "distinct slots, capture stream"),
            ("fired (either)", f"{self.fired}", "what the gaps are judged on"),
            (
                "duplicated (core)",
                f"{self.duplicated_core}",
                f"allowed; {self.duplicated_core_same_epoch} of them twice by one term (must be 0)",
            ),
            ("duplicated (stream)", f"{self.duplicated_stream}", "must be 0"),
            ("gaps", f"{self.gaps}", f"{self.skipped_slots} slots skipped by design"),
            ("caught up", f"{self.caught_up}", f"{self.late_fires} fires > {LATE}s late"),
            (
                "missed",
                f"{self.missed}",
                f"{self.missed_gaps} gaps not caught up, {len(self.lost_jobs)} jobs lost",
            ),
            ("longest gap", f"{self.longest_gap:.2f}s", self.longest_gap_job),
            ("phase violations", f"{self.phase_violations}", "must be 0"),
            ("epoch order violations", f"{self.epoch_order_violations}", "must be 0"),
            (
                "slow starts",
                f"{self.slow_starts}",
                f"terms firing > {SLOW_START:.0f}s after winning",
            ),
            ("stale status replies", f"{self.stale_status}", "API named an outdated leader"),
        ]
        for kind, times in sorted(self.recoveries().items()):
            rows.append(
                (
                    f"recovery {kind}",
                    f"{statistics.median(times):.2f}s",
                    f"median of {len(times)}, max {max(times):.2f}s (fault -> new epoch fires)",
                )
            )
        width = max(len(r[0]) for r in rows)
        lines = [
            f"chaos: {self.topology}, {self.jobs} jobs, {self.seconds:.0f}s of faults",
            *(f"  {name:<{width}}  {value:>8}  {note}" for name, value, note in rows),
            "  faults (t = seconds since the first fault; recovery = first fire of a new epoch):",
        ]
        t0 = self.faults[0].start if self.faults else 0.0
        for fault in self.faults:
            recovered = (
                f"{fault.recovered_after:.2f}s" if fault.recovered_after is not None else "-"
            )
            lines.append(
                f"    t={fault.start - t0:6.1f}  {fault.kind:<15} {fault.target:<10}"
                f" recovery {recovered:>7}  {fault.note}"
            )
        failures = self.failures()
        lines.append("  result: " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
        return "\n".join(lines)


def analyse(
    report: Report,
    jobs: list[str],
    core: list[Seen],
    stream: list[Seen],
    wins: dict[int, float],
    cutoff_ms: int,
) -> list[tuple[str, int, int]]:
    """Fill `report`'s counters from what the observers saw (see the module docstring).

    Returns every gap as (job, first missing slot ms, slots missing).
    """
    by_job_core: dict[str, list[Seen]] = defaultdict(list)
    by_job_stream: dict[str, list[Seen]] = defaultdict(list)
    for seen in core:
        by_job_core[seen.job].append(seen)
    for seen in stream:
        by_job_stream[seen.job].append(seen)
    report.duplicated_stream_ids = sum(
        1 for n in Counter(f"{s.job}:{s.slot_ms}" for s in stream).values() if n > 1
    )
    # When each leader term began firing (its first fire seen by anyone), for the gaps.
    takeover: dict[int, float] = {}
    for seen in (*core, *stream):
        if seen.slot_ms <= cutoff_ms:
            takeover[seen.epoch] = min(seen.at, takeover.get(seen.epoch, seen.at))
    examples: dict[str, list[Any]] = defaultdict(list)
    firing_since = min(takeover.values(), default=0.0)
    for epoch, won in sorted(wins.items()):
        began = takeover.get(epoch)
        if won < firing_since:
            continue  # won before the jobs were created: nothing was due yet
        if began is not None and began - won > SLOW_START:
            report.slow_starts += 1
            examples["slow_start"].append({"epoch": epoch, "won": won, "first_fire": began})
    gaps: list[tuple[str, int, int]] = []
    for job in jobs:
        _one_job(
            report,
            job,
            by_job_core.get(job, []),
            by_job_stream.get(job, []),
            wins,
            takeover,
            cutoff_ms,
            examples,
            gaps,
        )
    report.examples = {k: v[:10] for k, v in examples.items()}
    return gaps


def _one_job(
    report: Report,
    job: str,
    core: list[Seen],
    stream: list[Seen],
    wins: dict[int, float],
    takeover: dict[int, float],
    cutoff_ms: int,
    examples: dict[str, list[Any]],
    gaps: list[tuple[str, int, int]],
) -> None:
    everything = [s for s in (*core, *stream) if s.slot_ms <= cutoff_ms]
    if not everything:
        report.lost_jobs.append(job)
        examples["lost"].append({"job": job, "why": "never fired"})
        return
    # Every core observer sees every fire once; a duplicate is a second copy at ONE of them.
    per_observer = Counter((s.source, s.slot_ms) for s in core if s.slot_ms <= cutoff_ms)
    core_count: Counter[int] = Counter()
    for (_, ms), n in per_observer.items():
        core_count[ms] = max(core_count[ms], n)
    stream_count = Counter(s.slot_ms for s in stream if s.slot_ms <= cutoff_ms)
    first: dict[int, Seen] = {}
    epochs: dict[int, set[int]] = defaultdict(set)
    for seen in sorted(everything, key=lambda s: s.at):
        first.setdefault(seen.slot_ms, seen)
        epochs[seen.slot_ms].add(seen.epoch)
    start = min(first)
    grid = range(start, cutoff_ms + 1, INTERVAL_MS)
    off_phase = [ms for ms in first if (ms - start) % INTERVAL_MS]
    report.phase_violations += len(off_phase)
    if off_phase:
        examples["phase"].append({"job": job, "phase": start % 1000, "off": off_phase[:3]})
    report.slots_expected += len(grid)
    report.delivered_core += sum(1 for ms in grid if ms in core_count)
    report.stored_stream += sum(1 for ms in grid if ms in stream_count)
    report.fired += sum(1 for ms in grid if ms in first)
    dup_core = [ms for ms, n in core_count.items() if n > 1]
    report.duplicated_core += len(dup_core)
    for ms in dup_core:
        terms = Counter((s.source, s.epoch) for s in core if s.slot_ms == ms)
        if any(n > 1 for n in terms.values()):
            report.duplicated_core_same_epoch += 1
    for ms in dup_core[:2]:
        copies = [
            (s.source, s.instance, s.epoch, round(s.at - ms / 1000, 3))
            for s in core
            if s.slot_ms == ms
        ]
        examples["duplicated_core"].append({"job": job, "slot_ms": ms, "copies": copies})
    dup_stream = [ms for ms, n in stream_count.items() if n > 1]
    report.duplicated_stream += len(dup_stream)
    for ms in dup_stream[:2]:
        stored = [(s.instance, s.epoch, s.at) for s in stream if s.slot_ms == ms]
        examples["duplicated_stream"].append({"job": job, "slot_ms": ms, "copies": stored})
    report.late_fires += sum(1 for ms, s in first.items() if s.at - ms / 1000 > LATE)

    # Epoch order: the highest epoch seen so far (in slot order) never exceeds a later one.
    highest = 0
    for ms in sorted(epochs):
        low = min(epochs[ms])
        if low < highest:
            report.epoch_order_violations += 1
            examples["epoch_order"].append(
                {"job": job, "slot_ms": ms, "epochs": sorted(epochs[ms])}
            )
        highest = max(highest, max(epochs[ms]))

    # Longest time between consecutive fired slots (by arrival).
    on_grid = [ms for ms in sorted(first) if not (ms - start) % INTERVAL_MS]
    for a, b in itertools.pairwise(on_grid):
        pause = first[b].at - first[a].at
        if pause > report.longest_gap:
            report.longest_gap = pause
            report.longest_gap_job = f"{job} before slot {b}"

    # Gaps.
    missing_run: list[int] = []
    previous: int | None = None
    for ms in grid:
        if ms not in first:
            missing_run.append(ms)
            continue
        if missing_run:
            gaps.append((job, missing_run[0], len(missing_run)))
            _judge_gap(
                report, job, missing_run, ms, previous, first, epochs, wins, takeover, examples
            )
            missing_run = []
        previous = ms
    if missing_run:
        gaps.append((job, missing_run[0], len(missing_run)))
        report.gaps += 1
        report.skipped_slots += len(missing_run)
        report.lost_jobs.append(job)
        examples["lost"].append(
            {"job": job, "why": f"no fire after slot {previous}", "missing": len(missing_run)}
        )


def _judge_gap(
    report: Report,
    job: str,
    missing: list[int],
    next_ms: int,
    previous: int | None,
    first: dict[int, Seen],
    epochs: dict[int, set[int]],
    wins: dict[int, float],
    takeover: dict[int, float],
    examples: dict[str, list[Any]],
) -> None:
    report.gaps += 1
    report.skipped_slots += len(missing)
    nxt = first[next_ms]
    late = nxt.at - next_ms / 1000
    prev_epoch = max(epochs[previous]) if previous is not None else None
    gap = Gap(job, missing[0], len(missing), next_ms, round(late, 3), nxt.epoch, prev_epoch)
    if late > LATE:
        gap.caught_up, gap.reason = True, "late"
    elif prev_epoch is not None and nxt.epoch > prev_epoch:
        won = wins.get(nxt.epoch)
        began = takeover.get(nxt.epoch, nxt.at)
        if next_ms / 1000 <= began + TAKEOVER_SLACK:
            gap.caught_up, gap.reason = True, "new epoch, slot due when it took over"
        else:
            gap.reason = (
                f"epoch {nxt.epoch} (won at {won}) fired first at {began:.3f}, but this job's "
                f"next fire is slot {next_ms} ({next_ms / 1000 - began:.3f}s later, on time): "
                f"its latest missed slot {missing[-1]} never fired"
            )
    else:
        gap.reason = "same epoch and on time: slots vanished without a takeover"
    if gap.caught_up:
        report.caught_up += 1
    else:
        report.missed_gaps += 1
        examples["missed"].append(asdict(gap))
