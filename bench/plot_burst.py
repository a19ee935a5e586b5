"""Plot a report of bench/burst.py: drain and median lateness of a herd against N.

    python bench/plot_burst.py bench/results/burst.json              # -> docs/burst.png
    python bench/plot_burst.py REPORT.json --out /tmp/burst.png

Two panels, log-log: the drain (the last job's fire minus the slot) and the median (p50)
of (arrival - slot), each against the number of jobs on the slot, one line per mode
through the medians of the repeats, every run as a faint point. Dashed: the targets
(drain of the service <= 0.6 x the APScheduler baseline's; p50 <= 0.6 x the service's
own drain). The title names the date, the commit and the machine, so a figure is never
read without them. Needs matplotlib (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

STYLE = {  # mode: (label, colour, marker)
    "service": ("nats-cron serve", "#1f6fb4", "o"),
    "apscheduler": ("APScheduler 3 (baseline)", "#d9822b", "s"),
    "nats_schedules": ("nats-server schedules", "#3a9a4a", "^"),
}
PANELS = (("drain_s", "drain: last fire - slot"), ("p50_s", "median fire - slot"))
TARGET = 0.6


def seconds(value: float, _pos: Any = None) -> str:
    if value >= 1:
        return f"{value:g} s"
    return f"{value * 1000:g} ms"


def jobs(value: float, _pos: Any = None) -> str:
    return f"{value / 1000:g}k" if value >= 1000 else f"{value:g}"


def title_of(report: dict[str, Any]) -> str:
    mach = report.get("machine") or {}
    commit = mach.get("git_head") or "?"
    if mach.get("package_modified"):
        commit += " (modified)"
    date = str(report.get("date") or "")[:10] or "?"
    config = report.get("config") or {}
    server = config.get("nats_server")
    parts = [
        f"{date}, commit {commit}",
        f"{mach.get('cpus', '?')} CPUs, load {mach.get('loadavg_1m_at_start', '?')}",
        f"Python {mach.get('python', '?')}" + (f", nats-server {server}" if server else ""),
        f"{config.get('repeats', '?')} repeat" + ("" if config.get("repeats") == 1 else "s"),
    ]
    return f"N jobs on one cron slot ({config.get('cron', '*/20 * * * * *')})\n" + "; ".join(parts)


def plot(report: dict[str, Any], out: Path) -> None:
    plt.rcParams.update({"font.size": 13, "axes.titlesize": 14, "legend.fontsize": 11})
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.8), constrained_layout=True)
    medians = report.get("median") or {}
    runs = report.get("runs") or {}
    counts = sorted({int(n) for per_n in medians.values() for n in per_n})
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        for mode, (name, colour, marker) in STYLE.items():
            if mode not in medians:
                continue
            xs, ys = [], []
            for n in counts:
                value = (medians[mode].get(str(n)) or {}).get(key)
                if value is not None and value > 0:
                    xs.append(n)
                    ys.append(value)
            raw = [
                (int(n), r[key])
                for n, rs in (runs.get(mode) or {}).items()
                for r in rs
                if r.get(key) is not None and r[key] > 0
            ]
            if raw:
                ax.scatter(*zip(*raw, strict=True), color=colour, alpha=0.25, s=22, lw=0)
            ax.plot(xs, ys, color=colour, marker=marker, lw=2.2, ms=8, label=name)
        target = _target_line(medians, key, counts)
        if target:
            ax.plot(*target[:2], color="#555555", ls="--", lw=1.2, label=target[2])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(counts)
        ax.xaxis.set_major_formatter(FuncFormatter(jobs))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
        ax.yaxis.set_major_formatter(FuncFormatter(seconds))
        ax.set_xlabel("jobs on the slot")
        ax.set_title(label)
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
    # The modes once, below both panels; each panel's target line in its empty upper left
    # (a legend of all four inside a panel covers a line somewhere).
    handles, labels = axes[0].get_legend_handles_labels()
    modes = [(h, lab) for h, lab in zip(handles, labels, strict=True) if "target" not in lab]
    fig.legend(*zip(*modes, strict=True), loc="outside lower center", ncol=3, frameon=False)
    for ax in axes:
        lines = [(h, lab) for h, lab in zip(*ax.get_legend_handles_labels(), strict=True)]
        targets = [(h, lab) for h, lab in lines if "target" in lab]
        if targets:
            ax.legend(*zip(*targets, strict=True), loc="upper left", frameon=False)
    fig.suptitle(title_of(report), fontsize=13)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    plt.close(fig)


def _target_line(
    medians: dict[str, Any], key: str, counts: list[int]
) -> tuple[list[int], list[float], str] | None:
    """Drain panel: 0.6 x the baseline's drain; p50 panel: 0.6 x the service's drain."""
    base_mode, label = (
        ("apscheduler", f"nats-cron's target: <= {TARGET} x APScheduler's")
        if key == "drain_s"
        else ("service", f"nats-cron's target: <= {TARGET} x its drain")
    )
    if base_mode not in medians or "service" not in medians:
        return None
    xs, ys = [], []
    for n in counts:
        value = (medians[base_mode].get(str(n)) or {}).get("drain_s")
        if value:
            xs.append(n)
            ys.append(TARGET * value)
    return (xs, ys, label) if xs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the JSON printed by bench/burst.py")
    parser.add_argument("--out", type=Path, default=Path("docs/burst.png"), help="PNG to write")
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    if report.get("benchmark") != "burst":
        parser.error(f"{args.report} is not a report of bench/burst.py")
    plot(report, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
