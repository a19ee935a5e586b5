"""The chaos run: three `nats-cron serve` processes, NATS, 100 jobs, a fault every ~10 s.

Topologies: `single` (one `nats-server`) and `cluster` (three nodes with routes, buckets
and streams at 3 replicas, every instance given all three URLs). Each instance reaches
NATS only through its own proxy group (`proxy.ProxyHub`), so the harness can cut one
instance off and can tell which node it is connected to. The harness observes directly:
one core subscriber per node (connected to that node only) and a capture stream; a
control connection asks the API and reads the stream back (see `analysis`).

Faults, cycled in this order, each aimed at the current leader (asked through the API
and confirmed by the fires arriving from it; with shards, the instance leading the most):

- kill_leader: SIGKILL; a fresh process takes its place a few seconds later.
- stop_leader: SIGSTOP for longer than the lease TTL, then SIGCONT.
- restart_server (single): stop the server, start it again on the same port and store.
- restart_node (cluster): SIGKILL the node the leader is connected to, start it again.
- cut_leader: the leader's proxies drop its connections and refuse new ones for a while.

After every fault the harness waits (bounded) for a fire of a newer epoch: a fault that
leaves no leader firing is reported as a stuck election, an instance that exits by itself
as a bug. Sleeping only paces the fault schedule; every check waits for an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from pathlib import Path

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy, StorageType, StreamConfig

from nats_apscheduler.client import CronClient
from nats_apscheduler.errors import ApiError, NoService
from tests.chaos.analysis import Fault, Report, Seen, analyse
from tests.chaos.procs import (
    NatsNode,
    ServeInstance,
    cluster_configs,
    free_ports,
    single_config,
)
from tests.chaos.proxy import ProxyHub

KINDS = {
    "single": ("kill_leader", "stop_leader", "restart_server", "cut_leader"),
    "cluster": ("kill_leader", "stop_leader", "restart_node", "cut_leader"),
}
INSTANCES = 3
_API_ERRORS = (NoService, ApiError, nats.errors.Error, TimeoutError, OSError)


@dataclass
class ChaosConfig:
    topology: str = "single"  # "single" | "cluster"
    seconds: float = 40.0  # length of the fault phase; faults start in it
    fault_every: float = 10.0
    first_fault_after: float = 2.0
    jobs: int = 100
    settle: float = 8.0  # quiet time after the last fault before the cut-off
    lease_ttl: int = 2
    shards: int = 1  # > 1: faults hit the instance leading the most shards
    kill_restart_after: float = 3.0
    freeze: float = 4.0  # > lease TTL: the frozen leader must lose its lease
    cut: float = 3.0
    server_down: float = 2.0
    recovery_timeout: float = 20.0
    health_timeout: float = 40.0
    seed: int | None = None

    def kinds(self) -> tuple[str, ...]:
        return KINDS[self.topology]

    def fault_times(self) -> list[float]:
        times, at = [], self.first_fault_after
        while at < self.seconds:
            times.append(at)
            at += self.fault_every
        return times


class ChaosRun:
    """One run on one topology. `await run()` returns the report; it always cleans up."""

    def __init__(
        self, config: ChaosConfig, workdir: Path, log: Callable[[str], None] = print
    ) -> None:
        self.cfg = config
        self.workdir = workdir
        self.say = log
        self.rng = random.Random(config.seed)
        self.run_id = f"{config.topology[0]}{secrets.token_hex(3)}"
        self.prefix = f"chaos.{self.run_id}"
        self.stream_name = f"CHAOS_{self.run_id}"
        self.nodes: list[NatsNode] = []
        self.hub: ProxyHub | None = None
        self.proxy_ports: dict[int, list[int]] = {}
        self.current: dict[int, ServeInstance] = {}
        self.every_instance: list[ServeInstance] = []
        self.nc: Client | None = None
        self.observers: list[Client] = []
        self.api: CronClient | None = None
        self.core: list[Seen] = []
        self.malformed = 0
        self._target_epochs: dict[int, int] = {}  # with shards: the target's shards
        self.stale_status: list[str] = []  # API replies naming a leader older than the fires
        self.faults: list[Fault] = []
        self.problems: list[str] = []
        self.jobs = [f"job{n}" for n in range(config.jobs)]
        self._env: dict[str, str] = {}

    # --- the run -------------------------------------------------------------------------------

    async def run(self) -> Report:
        started = time.monotonic()
        try:
            await self._setup()
            await self._create_jobs()
            await self._inject_faults()
            await self._settle()
            return await self._collect(time.monotonic() - started)
        finally:
            await self._cleanup()

    async def _setup(self) -> None:
        cfg = self.cfg
        self.workdir.mkdir(parents=True, exist_ok=True)
        if cfg.topology == "single":
            (port,) = free_ports(1)
            conf = single_config(self.workdir / "nats.conf", port, self.workdir / "nats-js")
            self.nodes = [NatsNode("nats", port, conf, self.workdir)]
        elif cfg.topology == "cluster":
            ports = free_ports(6)
            confs = cluster_configs(self.workdir, ports[:3], ports[3:])
            self.nodes = [
                NatsNode(f"n{i}", port, conf, self.workdir)
                for i, (port, conf) in enumerate(zip(ports[:3], confs, strict=True))
            ]
        else:
            raise ValueError(f"unknown topology {cfg.topology!r}")
        for node in self.nodes:
            node.start()
        await asyncio.gather(*(node.wait_ready() for node in self.nodes))
        # The control connection (API, stream) may use any node; each observer only its own
        # node, so one always survives a node's death. All reconnect fast: back before the
        # instances (which wait 2 s between attempts).
        self.nc = await self._connect([node.url for node in self.nodes], "chaos-control")
        self.api = CronClient(self.nc, timeout=3)
        replicas = 3 if cfg.topology == "cluster" else 1
        await self._create_stream(replicas)
        for i, node in enumerate(self.nodes):
            observer = await self._connect([node.url], f"chaos-observer-{i}")
            self.observers.append(observer)
            await observer.subscribe(f"{self.prefix}.>", cb=self._observer(f"core{i}"))
            await observer.flush()
        self.hub = ProxyHub()
        for slot in range(INSTANCES):
            self.proxy_ports[slot] = await self.hub.add_group(
                f"i{slot}", [node.port for node in self.nodes]
            )
        self._env = {
            "NATS_CRON_JOBS_BUCKET": f"chaos-{self.run_id}-jobs",
            "NATS_CRON_LEADER_BUCKET": f"chaos-{self.run_id}-leader",
            "NATS_CRON_EVENTS_STREAM": f"CHAOS_H_{self.run_id}",
            "NATS_CRON_EVENTS_PREFIX": f"chaos-ev.{self.run_id}",
            "NATS_CRON_REPLICAS": str(replicas),
            "NATS_CRON_LEASE_TTL": f"{cfg.lease_ttl}s",
            "NATS_CRON_SHARDS": str(cfg.shards),
            "LOG_LEVEL": "info",
        }
        for slot in range(INSTANCES):
            self._spawn(slot)
        await asyncio.gather(
            *(i.wait_log("nats-cron instance started", 45) for i in self.current.values())
        )
        self.say(
            f"[{self.run_id}] {cfg.topology}: {len(self.nodes)} nats-server(s), "
            f"{INSTANCES} instances up; logs in {self.workdir}"
        )

    async def _connect(self, servers: list[str], name: str) -> Client:
        return await nats.connect(
            servers=servers,
            name=name,
            connect_timeout=2,
            reconnect_time_wait=0.1,
            max_reconnect_attempts=-1,
            error_cb=self._quiet,
        )

    async def _create_stream(self, replicas: int) -> None:
        assert self.nc is not None
        js = self.nc.jetstream(timeout=5)
        config = StreamConfig(
            name=self.stream_name,
            subjects=[f"{self.prefix}.>"],
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=120.0,
        )
        deadline = time.monotonic() + 45  # a fresh cluster first elects its meta leader
        while True:
            try:
                await js.add_stream(config)
                return
            except (nats.errors.Error, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"could not create the capture stream: {exc}") from exc
                await asyncio.sleep(0.25)

    def _spawn(self, slot: int) -> ServeInstance:
        previous = self.current.get(slot)
        incarnation = previous.incarnation + 1 if previous is not None else 0
        url = ",".join(f"nats://127.0.0.1:{p}" for p in self.proxy_ports[slot])
        instance = ServeInstance(slot, incarnation, {**self._env, "NATS_URL": url}, self.workdir)
        self.current[slot] = instance
        self.every_instance.append(instance)
        return instance

    async def _create_jobs(self) -> None:
        assert self.api is not None
        await self._leader(self.cfg.health_timeout)
        # Anchors spread over one second, so that the fires (and the faults) hit every
        # phase of the second, not one burst.
        base = int(time.time()) + 3
        step = 1.0 / len(self.jobs)
        for n, job in enumerate(self.jobs):
            start = datetime.fromtimestamp(base + n * step, UTC).isoformat(timespec="milliseconds")
            document = {
                "target": {"subject": f"{self.prefix}.{job}"},
                "schedule": {"every": "1s", "start": start},
            }
            for attempt in range(20):
                try:
                    await self.api.create(document)
                    break
                except ApiError as exc:
                    if exc.code == 409:
                        break  # an earlier attempt landed but its reply was lost
                    if attempt == 19:
                        raise
                except (NoService, nats.errors.Error, TimeoutError):
                    if attempt == 19:
                        raise
                await asyncio.sleep(0.2)
        await self._wait(
            lambda: len({s.job for s in self.core}) == len(self.jobs),
            20,
            "every job fired at least once",
        )
        self.say(f"[{self.run_id}] {len(self.jobs)} jobs firing every 1s")

    async def _inject_faults(self) -> None:
        kinds = self.cfg.kinds()
        t0, wall0 = time.monotonic(), time.time()
        for k, at in enumerate(self.cfg.fault_times()):
            # A random fraction of a second on top, so that faults land at every phase of
            # the jobs' second (a fixed period would hit the same few jobs every time).
            at += self.rng.random()
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            if not await self._healthy():
                self.say(f"[{self.run_id}] not healthy: no more faults")
                return
            kind = kinds[k % len(kinds)]
            await getattr(self, f"_fault_{kind}")()
            fault = self.faults[-1]
            recovered = (
                f"{fault.recovered_after:.2f}s" if fault.recovered_after is not None else "none"
            )
            self.say(
                f"[{self.run_id}] t={fault.start - wall0:5.1f}s {kind} {fault.target}: "
                f"new leader firing after {recovered}; {fault.note}"
            )

    async def _settle(self) -> None:
        await asyncio.sleep(self.cfg.settle)
        await self._healthy()
        # A few more seconds: the cut-off leaves every counted slot 2 s to arrive.
        await asyncio.sleep(2.5)

    async def _collect(self, elapsed: float) -> Report:
        end = time.time()
        cutoff_ms = int((end - 2.0) * 1000)
        self._check_exits()
        core = list(self.core)
        stopping = [i for i in self.current.values() if i.alive()]
        await asyncio.gather(*(asyncio.to_thread(i.terminate) for i in stopping))
        for instance in stopping:
            if instance.returncode() not in (0, None):
                self.problems.append(
                    f"{instance.instance_id} exited {instance.returncode()} on SIGTERM: "
                    f"{instance.tail(5)}"
                )
        stream = await self._read_stream()
        wins: dict[int, float] = {}
        for instance in self.every_instance:
            for epoch, at in instance.wins():
                wins[epoch] = at
        report = Report(self.cfg.topology, len(self.jobs), self.cfg.seconds, faults=self.faults)
        gaps = analyse(report, self.jobs, core, stream, wins, cutoff_ms)
        self._attribute(gaps)
        report.problems = list(self.problems)
        if self.malformed:
            report.problems.append(f"{self.malformed} fires without proper headers")
        report.workdir = str(self.workdir)
        report.run_id = self.run_id
        report.stale_status = len(self.stale_status)
        report.examples["stale_status"] = self.stale_status[:5]
        report.examples["log_warnings"] = self._warnings()
        report.examples["elapsed_s"] = [round(elapsed, 1)]
        self._save(core, stream, wins, cutoff_ms, report)
        return report

    async def _cleanup(self) -> None:
        await asyncio.gather(
            *(asyncio.to_thread(i.terminate, 5.0) for i in self.every_instance),
            return_exceptions=True,
        )
        for nc in [*self.observers, self.nc]:
            if nc is not None and not nc.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 5)
        if self.hub is not None:
            self.hub.close()
        await asyncio.gather(
            *(asyncio.to_thread(node.terminate, 10.0) for node in self.nodes),
            return_exceptions=True,
        )

    # --- faults ----------------------------------------------------------------------------------

    async def _fault_kill_leader(self) -> None:
        leader, epoch = await self._leader(self.cfg.health_timeout)
        fault = self._begin("kill_leader", leader.instance_id, epoch)
        leader.kill()
        recovery = asyncio.create_task(self._recovery(fault))
        await asyncio.sleep(self.cfg.kill_restart_after)
        fresh = self._spawn(leader.slot)
        fault.end = time.time()
        await recovery
        fault.note = f"restarted as {fresh.instance_id}"

    async def _fault_stop_leader(self) -> None:
        leader, epoch = await self._leader(self.cfg.health_timeout)
        fault = self._begin("stop_leader", leader.instance_id, epoch)
        mark = leader.mark()
        leader.signal(signal.SIGSTOP)
        recovery = asyncio.create_task(self._recovery(fault))
        try:
            await asyncio.sleep(self.cfg.freeze)
        finally:
            leader.signal(signal.SIGCONT)
        fault.end = time.time()
        await recovery
        try:
            lost = await leader.wait_log("lost the lease", 10, since=mark)
            fault.note = f"thawed: {lost['msg']!r}"
        except TimeoutError:
            self.problems.append(
                f"{leader.instance_id} was frozen {self.cfg.freeze}s as leader but never "
                "logged 'lost the lease' after SIGCONT"
            )
            fault.note = "thawed leader never logged 'lost the lease'"

    async def _fault_restart_server(self) -> None:
        leader, epoch = await self._leader(self.cfg.health_timeout)
        node = self.nodes[0]
        fault = self._begin("restart_server", node.name, epoch)
        await asyncio.to_thread(node.terminate)
        recovery = asyncio.create_task(self._recovery(fault))
        await asyncio.sleep(self.cfg.server_down)
        await self._restart(node, fault)
        await recovery
        fault.note = f"down {fault.end - fault.start:.1f}s (leader was {leader.instance_id})"

    async def _fault_restart_node(self) -> None:
        leader, epoch = await self._leader(self.cfg.health_timeout)
        assert self.hub is not None
        in_use = sorted(self.hub.nodes_in_use(f"i{leader.slot}"))
        index = in_use[0] if in_use else self.rng.randrange(len(self.nodes))
        node = self.nodes[index]
        fault = self._begin("restart_node", node.name, epoch)
        node.kill()
        recovery = asyncio.create_task(self._recovery(fault))
        await asyncio.sleep(self.cfg.server_down)
        await self._restart(node, fault)
        await recovery
        which = "the leader's node" if in_use else "leader's node unknown, picked at random"
        fault.note = f"{which} ({leader.instance_id}), down {fault.end - fault.start:.1f}s"

    async def _fault_cut_leader(self) -> None:
        leader, epoch = await self._leader(self.cfg.health_timeout)
        assert self.hub is not None
        fault = self._begin("cut_leader", leader.instance_id, epoch)
        mark = leader.mark()
        group = f"i{leader.slot}"
        refused = self.hub.stats(group)["refused"]
        dropped = await self.hub.cut(group, self.cfg.cut)
        recovery = asyncio.create_task(self._recovery(fault))
        await asyncio.sleep(self.cfg.cut)
        fault.end = time.time()
        await recovery
        refused = self.hub.stats(group)["refused"] - refused
        fault.note = f"dropped {dropped} connection(s), refused {refused} for {self.cfg.cut:.0f}s"
        try:
            await leader.wait_log("NATS connection restored", 15, since=mark)
        except TimeoutError:
            if leader.alive():
                self.problems.append(
                    f"{leader.instance_id} did not reconnect within 15s after its cut ended"
                )

    @staticmethod
    def _busiest(shards: list[dict[str, object]]) -> tuple[str | None, int, dict[int, int]]:
        """The instance leading the most shards: its name, the highest epoch among them,
        and each of its shards' epoch."""
        held = Counter(str(s["owner"]) for s in shards if s.get("owner"))
        if not held:
            return None, 0, {}
        name = held.most_common(1)[0][0]
        epochs = {
            int(str(s["shard"])): int(str(s["epoch"])) for s in shards if s.get("owner") == name
        }
        return name, max(epochs.values()), epochs

    def _begin(self, kind: str, target: str, epoch: int) -> Fault:
        fault = Fault(kind, target, time.time(), old_epoch=epoch)
        if self._target_epochs:
            fault.old_epochs = dict(self._target_epochs)
        self.faults.append(fault)
        return fault

    async def _restart(self, node: NatsNode, fault: Fault) -> None:
        node.start()
        try:
            await node.wait_ready()
        except RuntimeError as exc:
            self.problems.append(f"{node.name} did not come back: {exc}")
        fault.end = time.time()

    async def _recovery(self, fault: Fault) -> None:
        """Wait for the first fire of an epoch newer than the one the fault hit (with shards:
        in every shard the target led)."""
        index = len(self.core)
        deadline = time.monotonic() + self.cfg.recovery_timeout
        waiting = dict(fault.old_epochs) or {-1: fault.old_epoch}
        while time.monotonic() < deadline + self._extra(fault):
            upto = len(self.core)
            for seen in self.core[index:upto]:
                key = seen.shard if fault.old_epochs else -1
                if key in waiting and seen.epoch > waiting[key]:
                    del waiting[key]
                    if not waiting:
                        fault.recovered_after = round(seen.at - fault.start, 3)
                        return
            index = upto
            await asyncio.sleep(0.02)
        self.problems.append(
            f"stuck: no fire from a new leader within {self.cfg.recovery_timeout:.0f}s "
            f"after {fault.kind} {fault.target} (fault started at {fault.start:.3f})"
        )

    def _extra(self, fault: Fault) -> float:
        # The clock for a server restart starts when it is back, not when it went down.
        if fault.kind in ("restart_server", "restart_node") and fault.end:
            return fault.end - fault.start
        return 0.0

    # --- health and the leader -------------------------------------------------------------------

    async def _healthy(self) -> bool:
        """Every slot has a live, started instance and a leader fires; False if not in time."""
        deadline = time.monotonic() + self.cfg.health_timeout
        self._check_exits()
        try:
            for instance in list(self.current.values()):
                await instance.wait_log(
                    "nats-cron instance started", max(0.1, deadline - time.monotonic())
                )
            await self._leader(max(0.1, deadline - time.monotonic()))
        except TimeoutError as exc:
            self._check_exits()
            self.problems.append(f"stuck: not healthy within {self.cfg.health_timeout}s: {exc}")
            return False
        return True

    def _check_exits(self) -> None:
        """An instance that exits without being told to is a bug; replace it and go on."""
        for slot, instance in list(self.current.items()):
            if instance.proc is None or instance.alive() or instance.expected_exit:
                continue
            instance.expected_exit = True  # reported once
            self.problems.append(
                f"{instance.instance_id} exited by itself with code {instance.returncode()}; "
                f"log tail:\n{instance.tail(10)}"
            )
            self._spawn(slot)

    async def _leader(self, timeout: float) -> tuple[ServeInstance, int]:
        """The leader as the API names it, once the latest fires come from it."""
        assert self.api is not None
        deadline = time.monotonic() + timeout
        last_reason = "no reply"
        while time.monotonic() < deadline:
            try:
                status = await self.api.status()
            except _API_ERRORS as exc:
                last_reason = f"status: {exc!r}"
                await asyncio.sleep(0.1)
                continue
            leader = status.get("leader") or {}
            name, epoch = leader.get("instance_id"), int(leader.get("epoch") or 0)
            if status.get("shards"):
                name, epoch, self._target_epochs = self._busiest(status["shards"])
            instance = next(
                (i for i in self.current.values() if i.instance_id == name and i.alive()), None
            )
            latest = self.core[-1] if self.core else None
            if latest is not None and latest.epoch > epoch and time.time() - latest.at < 1.0:
                # The answering instance has not seen a takeover the fires already show.
                self.stale_status.append(
                    f"{status.get('instance_id')} named {name} (epoch {epoch}) while "
                    f"{latest.instance} fired with epoch {latest.epoch}"
                )
            if instance is None:
                last_reason = f"API names leader {name!r}"
            elif latest is None:
                return instance, epoch  # nothing fires yet: the API's word is all we have
            elif (
                self._target_epochs
                and any(
                    seen.instance == name and time.time() - seen.at < 1.0
                    for seen in self.core[-50:]
                )
            ) or (
                latest.instance == name and latest.epoch == epoch and time.time() - latest.at < 1.0
            ):
                return instance, epoch
            else:
                last_reason = (
                    f"API names {name} epoch {epoch}, latest fire from {latest.instance} "
                    f"epoch {latest.epoch} {time.time() - latest.at:.1f}s ago"
                )
            await asyncio.sleep(0.1)
        raise TimeoutError(f"no leader firing within {timeout:.0f}s ({last_reason})")

    # --- observers ---------------------------------------------------------------------------

    def _observer(self, source: str) -> Callable[[Msg], Awaitable[None]]:
        async def on_fire(msg: Msg) -> None:
            seen = _parse(msg, time.time(), source)
            if seen is None:
                self.malformed += 1
            else:
                self.core.append(seen)

        return on_fire

    async def _read_stream(self) -> list[Seen]:
        """Everything the capture stream stored, through an ordered consumer."""
        assert self.nc is not None
        js = self.nc.jetstream(timeout=10)
        info = await js.stream_info(self.stream_name)
        total = info.state.messages
        sub = await js.subscribe(
            f"{self.prefix}.>",
            stream=self.stream_name,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        out: list[Seen] = []
        try:
            for _ in range(total):
                msg = await sub.next_msg(timeout=10)
                at = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else 0.0
                seen = _parse(msg, at, "stream")
                if seen is not None:
                    out.append(seen)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out

    async def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not within {timeout}s: {what}")
            await asyncio.sleep(0.05)

    async def _quiet(self, exc: Exception) -> None:
        pass  # the observer's own reconnects are expected during server restarts

    # --- report helpers ----------------------------------------------------------------------

    def _attribute(self, gaps: list[tuple[str, int, int]]) -> None:
        """Per fault: how many jobs had a gap starting during it, and the widest gap."""
        for k, fault in enumerate(self.faults):
            until = self.faults[k + 1].start if k + 1 < len(self.faults) else float("inf")
            mine = [
                slots for (_, first_ms, slots) in gaps if fault.start - 1 <= first_ms / 1000 < until
            ]
            extra = (
                f"{len(mine)} jobs with a gap, widest {max(mine)} slot(s)"
                if mine
                else "no gap (outage shorter than the 1s interval)"
            )
            fault.note = f"{fault.note}; {extra}" if fault.note else extra

    def _save(
        self,
        core: list[Seen],
        stream: list[Seen],
        wins: dict[int, float],
        cutoff_ms: int,
        report: Report,
    ) -> None:
        """Keep the raw observations next to the logs, as evidence."""
        raw = {
            "cutoff_ms": cutoff_ms,
            "wins": wins,
            "core": [astuple(s) for s in core],
            "stream": [astuple(s) for s in stream],
        }
        (self.workdir / "observations.json").write_text(json.dumps(raw), encoding="utf-8")
        (self.workdir / "report.json").write_text(
            json.dumps(report.to_json(), indent=2), encoding="utf-8"
        )

    def _warnings(self) -> list[str]:
        counts: Counter[str] = Counter()
        for instance in self.every_instance:
            for event in instance.events:
                if event.get("level") in ("warning", "error", "critical"):
                    msg = str(event.get("msg", ""))
                    counts[f"{event.get('level')}: {msg[:90]}"] += 1
        return [f"{n} x {msg}" for msg, n in counts.most_common(12)]


def _parse(msg: Msg, at: float, source: str) -> Seen | None:
    headers = msg.headers or {}
    try:
        msg_id = headers["Nats-Msg-Id"]
        slot_ms = int(msg_id.rsplit(":", 1)[1])
        epoch = int(headers.get("Nats-Cron-Epoch", "0"))
    except (KeyError, IndexError, ValueError):
        return None
    if msg_id.rsplit(":", 1)[0] != msg.subject:
        return None
    return Seen(
        msg.subject.rsplit(".", 1)[1],
        slot_ms,
        epoch,
        headers.get("Nats-Cron-Instance", ""),
        at,
        source,
        int(headers.get("Nats-Cron-Shard", "0")),
    )


async def run_chaos(
    config: ChaosConfig, workdir: Path, log: Callable[[str], None] = print
) -> Report:
    return await ChaosRun(config, workdir, log).run()
