"""Go `time.ParseDuration` syntax, the duration grammar of job documents and settings. Pure."""

from __future__ import annotations

import re
from datetime import timedelta

from nats_apscheduler.errors import SpecError

_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)([a-zµμ]+)")
_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def parse_duration(text: str, where: str) -> timedelta:
    """Go `time.ParseDuration` syntax (`300ms`, `1h30m`, `1.5h`); no `d` unit."""
    original = text
    if not text:
        raise SpecError(where, "empty duration (use e.g. 30s, 5m, 1h30m)")
    sign = 1
    if text[0] in "+-":
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return timedelta(0)
    total_ns = 0
    pos = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None or match.group(1) in ("", "."):
            raise SpecError(where, f"{original!r} is not a duration (use e.g. 30s, 5m, 1h30m)")
        number, unit = match.groups()
        if unit not in _UNITS_NS:
            raise SpecError(where, f'"{original}": unknown unit "{unit}" (use ns, us, ms, s, m, h)')
        whole, _, frac = number.partition(".")
        ns = int(whole or "0") * _UNITS_NS[unit]
        if frac:
            ns += int(frac) * _UNITS_NS[unit] // 10 ** len(frac)
        total_ns += ns
        if total_ns > 2**63 - 1:
            raise SpecError(where, f"{original!r} overflows (max about 2562047h)")
        pos = match.end()
    if 0 < total_ns < 1000:
        raise SpecError(where, f"{original!r} is below the minimum duration of 1us")
    return sign * timedelta(microseconds=total_ns // 1000)


def format_duration(value: timedelta) -> str:
    """Shortest exact Go-style text for a duration (`90m` -> `90m`, `1.5s` -> `1500ms`)."""
    us = value // timedelta(microseconds=1)
    for unit, size in (("h", 3_600_000_000), ("m", 60_000_000), ("s", 1_000_000), ("ms", 1000)):
        if us % size == 0:
            return f"{us // size}{unit}"
    return f"{us}us"
