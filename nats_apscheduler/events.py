"""What the events stream and the dead letter subject receive (SPEC §10): the event of a
settled run, of slots not fired, and a dead letter's message. Pure: bytes from values.

Every event carries the job's run state as it stands after it (`runs`, `last_success`,
`consecutive_failures`; an event of slots not fired also `last_scheduled`, `last_run`,
`last_error`), so that an instance rebuilds the run state from a job's last event alone
(`history.RunStates.apply`). The event of a publish is built on the fire path itself
(`fire.Firer.write`, without json.dumps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats_apscheduler._wire import hpub
from nats_apscheduler.delivery import REPLY_KEPT, Outcome
from nats_apscheduler.history import RunState
from nats_apscheduler.plan import FirePlan, rfc3339, slot_ms
from nats_apscheduler.protocol import dead_subject

# Headers a dead letter adds to its last attempt's.
H_OUTCOME = "Nats-Cron-Outcome"
H_ERROR = "Nats-Cron-Error"
H_BODY = "Nats-Cron-Body"
_ERROR_HEADER_MAX = 160


@dataclass(slots=True)
class Skip:
    """Slots of one job that were due and will never fire: `missed` (older than a caught-up
    slot, or past the grace window) or `skipped` (overlap: the previous run still going)."""

    subject: str
    count: int
    first: datetime
    last: datetime
    more: bool  # and slots before `first` (older than the grace window), not counted
    past_grace: bool  # none of this outage's slots fired
    kind: str = "missed"


@dataclass(slots=True)
class Run:
    """One attempt awaiting its reply: what its event and a dead letter need."""

    plan: FirePlan
    slot: datetime
    attempt: int
    caught_up: bool
    actual: str  # when this attempt was written (RFC 3339)
    header: bytes  # the attempt's header block, as sent
    body: bytes


def outcome_record(
    run: Run,
    outcome: Outcome,
    state: RunState | None,
    instance: str,
    epoch: int,
    extra: dict[str, Any],
) -> bytes:
    """The event of a settled attempt (`extra`: attempts, next_attempt, dead_letter)."""
    subject = run.plan.subject
    record: dict[str, Any] = {
        "subject": subject,
        "scheduled": rfc3339(run.slot),
        "actual": run.actual,
        "attempt": run.attempt,
        "outcome": outcome.outcome,
        "duration": round(outcome.duration, 6),
        "error": outcome.error,
        "instance": instance,
        "epoch": epoch,
        "run_id": f"{subject}:{slot_ms(run.slot)}:{run.attempt}",
        "mode": run.plan.delivery.mode,
    }
    if run.caught_up:
        record["caught_up"] = True
    if outcome.reply is not None:
        record["reply"] = outcome.reply[:REPLY_KEPT].decode("utf-8", "replace")
    if outcome.stream is not None:
        record["stream"] = outcome.stream
        record["seq"] = outcome.seq
        record["duplicate"] = outcome.duplicate
    record.update(extra)
    record["runs"] = state.run_count if state is not None else 0
    record["last_success"] = state.last_success if state is not None else None
    record["consecutive_failures"] = state.consecutive_failures if state is not None else 0
    return json.dumps(record).encode()


def skip_record(
    skip: Skip, state: RunState | None, instance: str, epoch: int, now: datetime
) -> bytes:
    """The event of slots not fired (`missed` or `skipped`)."""
    if skip.kind == "skipped":
        why = "skipped: the previous run is still in progress (overlap: skip)"
    elif skip.past_grace:
        why = "past the grace window: not fired"
    else:
        why = "coalesced: only the latest missed slot fires"
    count = f"{skip.count}+" if skip.more else str(skip.count)
    return json.dumps(
        {
            "subject": skip.subject,
            "scheduled": rfc3339(skip.last),
            "actual": rfc3339(now),
            "attempt": None,
            "outcome": skip.kind,
            "duration": None,
            "error": f"{count} slot(s) from {rfc3339(skip.first)} to {rfc3339(skip.last)} {why}",
            "instance": instance,
            "epoch": epoch,
            "skipped": skip.count,
            "first": rfc3339(skip.first),
            "last": rfc3339(skip.last),
            "more": skip.more,
            "runs": state.run_count if state is not None else 0,
            "last_scheduled": state.last_scheduled if state is not None else None,
            "last_run": state.last_run if state is not None else None,
            "last_error": state.last_error if state is not None else None,
            "last_success": state.last_success if state is not None else None,
            "consecutive_failures": state.consecutive_failures if state is not None else 0,
        }
    ).encode()


def dead_letter(run: Run, outcome: Outcome, max_payload: int) -> bytes:
    """The last attempt's message on `nats-cron.dead.<subject>`: its payload and headers,
    plus the outcome and error (a body that no longer fits `max_payload` is left out, and
    said so: a message over the limit would cost the connection)."""
    error = (outcome.error or "").replace("\r", " ").replace("\n", " ")[:_ERROR_HEADER_MAX]
    extra = f"{H_OUTCOME}: {outcome.outcome}\r\n{H_ERROR}: {error}\r\n\r\n".encode()
    header = run.header[:-2] + extra  # the block's closing CRLF moves to the end
    body = run.body
    if max_payload and len(header) + len(body) > max_payload:
        header = header[:-2] + f"{H_BODY}: dropped (too large)\r\n\r\n".encode()
        body = b""
    return hpub(dead_subject(run.plan.subject), "", header, body)
