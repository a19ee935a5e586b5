"""The long chaos run, printing the table (or JSON):

    python -m tests.chaos --minutes 5 --topology both [--json] [--jobs 100] [--keep]

`--minutes` is the length of the fault phase per topology (a fault every `--fault-every`
seconds, cycling through the kinds); setup, settling and read-back add about half a
minute each. Exit code 0 when every run passes the bar of `tests.chaos.analysis`, 1 if not.
Logs of every process stay in the work directory when a run fails (or with `--keep`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from tests.chaos.analysis import Report
from tests.chaos.harness import ChaosConfig, run_chaos


def _interrupt(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt  # SIGTERM: clean up like Ctrl-C does


async def _main(args: argparse.Namespace) -> list[Report]:
    topologies = ["single", "cluster"] if args.topology == "both" else [args.topology]
    reports = []
    for topology in topologies:
        workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{topology}-"))
        config = ChaosConfig(
            topology=topology,
            seconds=args.minutes * 60,
            fault_every=args.fault_every,
            jobs=args.jobs,
            seed=args.seed,
            shards=args.shards,
        )
        log = (lambda line: print(line, file=sys.stderr)) if args.json else print
        report = await run_chaos(config, workdir, log)
        reports.append(report)
        if not args.json:
            print(report.table(), flush=True)
        if report.failures() or args.keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return reports


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--topology", choices=["single", "cluster", "both"], default="both")
    parser.add_argument("--fault-every", type=float, default=10.0)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--shards", type=int, default=1, help="NATS_CRON_SHARDS of the instances")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    reports = asyncio.run(_main(args))
    if args.json:
        print(json.dumps([r.to_json() for r in reports], indent=2))
    return 0 if all(not r.failures() for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
