"""A job's `delivery` field (SPEC §10): the modes (publish, jetstream, request), the reply's
timeout, retries with backoff and overlap; their rules and their canonical form. Pure, no
I/O (`spec` validates the whole document with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from nats_apscheduler.durations import format_duration, parse_duration
from nats_apscheduler.errors import SpecError

MODES = ("publish", "jetstream", "request")
OVERLAPS = ("allow", "skip")
DEFAULT_TIMEOUTS = {"request": timedelta(seconds=30), "jetstream": timedelta(seconds=5)}
MAX_TIMEOUT = timedelta(hours=1)
MAX_ATTEMPTS = 100
MAX_MULTIPLIER = 100.0
MAX_BACKOFF = timedelta(hours=24)
DEFAULT_BACKOFF = timedelta(seconds=1)
DEFAULT_MAX_BACKOFF = timedelta(minutes=1)
DEFAULT_MULTIPLIER = 2.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryField(_Strict):
    """The shape of `delivery.retry` (pydantic; the rules are `parse_delivery`'s)."""

    attempts: StrictInt
    backoff: StrictStr | None = None
    max_backoff: StrictStr | None = None
    multiplier: Any = None  # a number: checked in _retry (a pydantic union names its members)


class DeliveryField(_Strict):
    """The shape of `delivery` (pydantic; the rules are `parse_delivery`'s)."""

    mode: StrictStr | None = None
    timeout: StrictStr | None = None
    retry: RetryField | None = None
    overlap: StrictStr | None = None


@dataclass(frozen=True)
class RetrySpec:
    """How a failed run is retried: `attempts` in all (the first included), waiting
    `backoff`, then `backoff x multiplier` per further attempt, at most `max_backoff`."""

    attempts: int
    backoff: timedelta = DEFAULT_BACKOFF
    max_backoff: timedelta = DEFAULT_MAX_BACKOFF
    multiplier: float = DEFAULT_MULTIPLIER

    def delay(self, failed: int) -> timedelta:
        """The wait after failed attempt number `failed` (1 for the first) before the next."""
        wait = self.backoff.total_seconds()
        cap = self.max_backoff.total_seconds()
        for _ in range(max(0, failed - 1)):
            wait *= self.multiplier
            if wait >= cap:
                break
        return timedelta(seconds=min(wait, cap))

    def to_document(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "backoff": format_duration(self.backoff),
            "max_backoff": format_duration(self.max_backoff),
            "multiplier": _number(self.multiplier),
        }


@dataclass(frozen=True)
class DeliverySpec:
    """How a fire is delivered and what counts as its outcome (SPEC §10)."""

    mode: str = "publish"
    timeout: timedelta | None = None  # the reply's (request) or PubAck's (jetstream) deadline
    retry: RetrySpec | None = None
    overlap: str = "allow"

    @property
    def tracked(self) -> bool:
        """A reply is awaited (request, jetstream); a publish has none."""
        return self.mode != "publish"

    def to_document(self) -> dict[str, Any] | None:
        """The canonical `delivery` field (None: the default, a plain publish)."""
        if self.mode == "publish":
            return None
        out: dict[str, Any] = {"mode": self.mode}
        if self.timeout is not None:
            out["timeout"] = format_duration(self.timeout)
        if self.retry is not None:
            out["retry"] = self.retry.to_document()
        if self.mode == "request":
            out["overlap"] = self.overlap
        return out


PUBLISH = DeliverySpec()


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _positive(text: str, where: str, limit: timedelta) -> timedelta:
    value = parse_duration(text, where)
    if value <= timedelta(0):
        raise SpecError(where, f"{text!r} must be positive")
    if value > limit:
        raise SpecError(where, f"{text!r} is longer than the maximum of {format_duration(limit)}")
    return value


def parse_delivery(raw: DeliveryField | None) -> DeliverySpec:
    """The `delivery` field's rules (its shape was checked by pydantic)."""
    if raw is None:
        return PUBLISH
    mode = raw.mode if raw.mode is not None else "publish"
    if mode not in MODES:
        raise SpecError("delivery.mode", f"{mode!r} is not one of {', '.join(MODES)}")
    tracked = mode != "publish"
    if not tracked:
        for name in ("timeout", "retry"):
            if getattr(raw, name) is not None:
                raise SpecError(
                    f"delivery.{name}",
                    "needs mode request or jetstream (a publish has no reply and no outcome "
                    "to wait for)",
                )
    if raw.overlap is not None:
        if mode != "request":
            raise SpecError(
                "delivery.overlap",
                "needs mode request (only a request has a run that can still be going)",
            )
        if raw.overlap not in OVERLAPS:
            raise SpecError("delivery.overlap", f"{raw.overlap!r} is not one of allow, skip")
    if not tracked:
        return PUBLISH
    timeout = (
        _positive(raw.timeout, "delivery.timeout", MAX_TIMEOUT)
        if raw.timeout is not None
        else DEFAULT_TIMEOUTS[mode]
    )
    return DeliverySpec(mode, timeout, _retry(raw.retry), raw.overlap or "allow")


def _retry(raw: RetryField | None) -> RetrySpec | None:
    if raw is None:
        return None
    if not 1 <= raw.attempts <= MAX_ATTEMPTS:
        raise SpecError(
            "delivery.retry.attempts",
            f"{raw.attempts} is not from 1 to {MAX_ATTEMPTS} (the attempts in all, the first "
            "included)",
        )
    backoff = (
        _positive(raw.backoff, "delivery.retry.backoff", MAX_BACKOFF)
        if raw.backoff is not None
        else DEFAULT_BACKOFF
    )
    cap = (
        _positive(raw.max_backoff, "delivery.retry.max_backoff", MAX_BACKOFF)
        if raw.max_backoff is not None
        else max(DEFAULT_MAX_BACKOFF, backoff)
    )
    if cap < backoff:
        raise SpecError(
            "delivery.retry.max_backoff",
            f"{raw.max_backoff!r} is shorter than delivery.retry.backoff {raw.backoff!r}",
        )
    given = raw.multiplier
    if given is not None and (isinstance(given, bool) or not isinstance(given, int | float)):
        raise SpecError("delivery.retry.multiplier", f"must be a number, not {_json_type(given)}")
    multiplier = float(given) if given is not None else DEFAULT_MULTIPLIER
    if not 1.0 <= multiplier <= MAX_MULTIPLIER:
        raise SpecError(
            "delivery.retry.multiplier", f"{raw.multiplier} is not from 1 to {MAX_MULTIPLIER:g}"
        )
    return RetrySpec(raw.attempts, backoff, cap, multiplier)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, int | float) else "value")
