"""Prometheus metrics and the `/healthz` and `/readyz` endpoints of one instance.

`Metrics` owns a registry per instance (so several instances can share a process, as in
tests). Event counts are recorded as they happen; state (leadership, jobs, lease refresh
failures) is read at scrape time through callables. `web.HttpListener` serves them on
`/metrics`, with `/healthz` (the event loop answers and NATS is connected) and `/readyz`
(the store is loaded and the election runs), from the instance's own event loop: if the
loop hangs, the probes fail, which is what an orchestrator should see.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


@dataclass
class State:
    """Live values read at scrape time."""

    is_leader: Callable[[], bool]
    jobs: Callable[[], int]
    leader_changes: Callable[[], int]
    refresh_failures: Callable[[], int]
    connected: Callable[[], bool]
    ready: Callable[[], bool]
    loop_lag: Callable[[], float] = lambda: 0.0
    loop_lag_recent: Callable[[], float] = lambda: 0.0
    loop_lags: Callable[[], tuple[list[int], float]] = lambda: ([0] * (len(LAG_BUCKETS) + 1), 0.0)
    shards_held: Callable[[], int] = lambda: 0
    handovers: Callable[[], int] = lambda: 0
    unconfirmed: Callable[[], int] = lambda: 0
    in_flight: Callable[[], int] = lambda: 0
    in_flight_limit: Callable[[], int] = lambda: 0


class _StateCollector(Collector):
    def __init__(self, state: State) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        s = self._state
        yield GaugeMetricFamily("nats_cron_is_leader", "1 if this instance leads", s.is_leader())
        yield GaugeMetricFamily("nats_cron_jobs", "Jobs in the store", s.jobs())
        yield CounterMetricFamily(
            "nats_cron_leader_changes",
            "Leadership won or lost by this instance",
            s.leader_changes(),
        )
        yield CounterMetricFamily(
            "nats_cron_lease_refresh_failures", "Failed lease refreshes", s.refresh_failures()
        )
        yield GaugeMetricFamily("nats_cron_nats_connected", "1 if connected", s.connected())
        yield GaugeMetricFamily(
            "nats_cron_shards_held", "Shards this instance leads", s.shards_held()
        )
        yield CounterMetricFamily(
            "nats_cron_handovers",
            "Shards this instance handed over cleanly to balance the load",
            s.handovers(),
        )
        yield CounterMetricFamily(
            "nats_cron_unconfirmed_fires",
            "Fires not confirmed by a stored progress mark when a term ended (fired again)",
            s.unconfirmed(),
        )
        yield GaugeMetricFamily(
            "nats_cron_runs_in_flight",
            "Requests and JetStream publishes of this instance awaiting their reply",
            s.in_flight(),
        )
        yield GaugeMetricFamily(
            "nats_cron_runs_in_flight_limit",
            "At most this many in flight (NATS_CRON_MAX_IN_FLIGHT); due fires beyond wait",
            s.in_flight_limit(),
        )
        yield GaugeMetricFamily(
            "nats_cron_loop_lag_max_seconds",
            "Longest delay of the event loop seen since start (a stall blocks fires and lease)",
            s.loop_lag(),
        )
        yield GaugeMetricFamily(
            "nats_cron_loop_lag_recent_seconds",
            "Longest delay of the event loop in the last 30 seconds",
            s.loop_lag_recent(),
        )
        counts, total = s.loop_lags()
        yield HistogramMetricFamily(
            "nats_cron_loop_lag_seconds",
            "Delays of the event loop, measured every 50 ms",
            buckets=_cumulative(LAG_BUCKETS, counts),
            sum_value=total,
        )


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Prometheus histogram buckets (cumulative, `le` labels) from per-bucket counts."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip([*bounds, math.inf], counts, strict=True):
        total += count
        out.append(("+Inf" if bound == math.inf else str(bound), total))
    return out


class _FireCounts(Collector):
    """Per-fire counters kept in plain dicts and lists, turned into metric families at
    scrape time: on the fire path an increment is a dict update, not prometheus-client's
    label lookup, lock and child object (a quarter of the fire path's own time).

    Without per-subject series (`per_subject=False`, for deployments with very many jobs)
    the counters are kept under one key and exposed without the `subject` label, and the
    per-job last-success gauge is left out."""

    def __init__(self, per_subject: bool = True) -> None:
        self.per_subject = per_subject
        self.fires: collections.Counter[tuple[str, str]] = collections.Counter()
        self.caught_up: collections.Counter[str] = collections.Counter()
        self.missed: collections.Counter[str] = collections.Counter()
        self.dead: collections.Counter[str] = collections.Counter()
        self.last_success: dict[str, float] = {}
        self.buckets = [0] * (len(LATENESS_BUCKETS) + 1)  # the last: +Inf
        self.lateness_sum = 0.0

    def collect(self) -> Iterator[Metric]:
        labels = ["subject", "outcome"] if self.per_subject else ["outcome"]
        fires = CounterMetricFamily(
            "nats_cron_fires",
            "Fires (attempts) by job and outcome: fired, caught_up (publish), succeeded, "
            "failed, timeout, no_responders (request), stored, failed (jetstream), skipped",
            labels=labels,
        )
        for (subject, outcome), count in sorted(self.fires.items()):
            fires.add_metric([subject, outcome] if self.per_subject else [outcome], count)
        yield fires
        if self.per_subject:
            success = GaugeMetricFamily(
                "nats_cron_last_success_timestamp_seconds",
                "Unix time of each job's last success (a fire, a reply, a PubAck) here",
                labels=["subject"],
            )
            for subject, at in sorted(self.last_success.items()):
                success.add_metric([subject], at)
            yield success
        for name, help_text, counts in (
            (
                "nats_cron_missed_slots",
                "Slots skipped: older than a caught-up slot, or past their grace window",
                self.missed,
            ),
            (
                "nats_cron_caught_up_slots",
                "Missed slots fired late after a takeover or restart",
                self.caught_up,
            ),
            (
                "nats_cron_dead_letters",
                "Runs whose retries were exhausted (sent to nats-cron.dead.<subject>)",
                self.dead,
            ),
        ):
            family = CounterMetricFamily(
                name, help_text, labels=["subject"] if self.per_subject else []
            )
            for subject, count in sorted(counts.items()):
                family.add_metric([subject] if self.per_subject else [], count)
            yield family
        yield HistogramMetricFamily(
            "nats_cron_fire_lateness_seconds",
            "Publish time minus scheduled time",
            buckets=_cumulative(LATENESS_BUCKETS, self.buckets),
            sum_value=self.lateness_sum,
        )


#: Outcomes after which a job's last-success time moves.
_SUCCESS = frozenset({"fired", "caught_up", "succeeded", "stored"})


class Metrics:
    def __init__(self, state: State, per_subject: bool = True) -> None:
        self.state = state
        self.per_subject = per_subject
        self.registry = CollectorRegistry()
        self._counts = _FireCounts(per_subject)
        self.registry.register(self._counts)
        self.api_requests = Counter(
            "nats_cron_api_requests",
            "API requests by endpoint and reply code",
            ["endpoint", "code"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(state))

    def on_fire(
        self, subject: str, outcome: str, lateness: float, caught_up: bool, at: float = 0.0
    ) -> None:
        """A publish went out (`at`: when, unix time)."""
        counts = self._counts
        if not self.per_subject:
            subject = ""
        counts.fires[(subject, outcome)] += 1
        lateness = max(0.0, lateness)
        counts.buckets[bisect.bisect_left(LATENESS_BUCKETS, lateness)] += 1
        counts.lateness_sum += lateness
        if caught_up:
            counts.caught_up[subject] += 1
        if self.per_subject:
            counts.last_success[subject] = at or time.time()

    def on_sent(self, subject: str, lateness: float, caught_up: bool) -> None:
        """A request or JetStream publish went out (counted by outcome when it settles)."""
        counts = self._counts
        lateness = max(0.0, lateness)
        counts.buckets[bisect.bisect_left(LATENESS_BUCKETS, lateness)] += 1
        counts.lateness_sum += lateness
        if caught_up:
            counts.caught_up[subject if self.per_subject else ""] += 1

    def on_outcome(self, subject: str, outcome: str, at: float) -> None:
        """A run's attempt settled (or a slot was skipped)."""
        counts = self._counts
        if not self.per_subject:
            counts.fires[("", outcome)] += 1
            return
        counts.fires[(subject, outcome)] += 1
        if outcome in _SUCCESS:
            counts.last_success[subject] = at

    def on_missed(self, subject: str, count: int = 1) -> None:
        self._counts.missed[subject if self.per_subject else ""] += count

    def on_dead_letter(self, subject: str) -> None:
        self._counts.dead[subject if self.per_subject else ""] += 1

    def forget(self, subject: str) -> None:
        """A job was deleted: its last-success series goes (counters stay, as counters do)."""
        self._counts.last_success.pop(subject, None)

    def fired_total(self) -> int:
        """Fires counted so far (every outcome)."""
        return sum(self._counts.fires.values())

    def on_request(self, endpoint: str, code: int) -> None:
        self.api_requests.labels(endpoint, str(code)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class LoopMonitor:
    """Measures how late the event loop runs a timer: the longest stall since start, and
    the longest of the last `window` seconds."""

    def __init__(self, period: float = 0.05, window: float = 30.0) -> None:
        self.period = period
        self.window = window
        self.longest = 0.0
        self.counts = [0] * (len(LAG_BUCKETS) + 1)  # per bucket of LAG_BUCKETS, then +Inf
        self.total = 0.0
        self._recent: collections.deque[tuple[float, float]] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    def recent(self) -> float:
        """The longest stall of the last `window` seconds."""
        horizon = time.monotonic() - self.window
        return max((lag for at, lag in self._recent if at >= horizon), default=0.0)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-monitor")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.period)
            lag = max(0.0, time.perf_counter() - before - self.period)
            self.counts[bisect.bisect_left(LAG_BUCKETS, lag)] += 1
            self.total += lag
            if lag > self.longest:
                self.longest = lag
            if lag > 0.002:  # keep the notable ones only
                now = time.monotonic()
                self._recent.append((now, lag))
                while self._recent and self._recent[0][0] < now - self.window:
                    self._recent.popleft()
