"""Protocol facts, written once: header names, JetStream error codes, nats-cron's subjects.

KV names come from nats-py's own `nats.js.kv` constants; what nats-py does not name
(compare-and-set headers, the server's wrong-last-sequence codes, the micro error headers)
is named here, and so is every subject of the nats-cron API, shared by service and client.
Every API subject is under `nats-cron.`, which no job may target (`spec.validate_subject`).
"""

from __future__ import annotations

from collections.abc import Mapping

from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE

# --- NATS and JetStream -------------------------------------------------------------------------

#: Compare-and-set on one subject of a stream (a KV key): the write succeeds only if the
#: subject's last message has this sequence (0: the subject has none).
EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
#: JSStreamWrongLastSequenceErr and JSStreamWrongLastSequenceConstantErr: the
#: compare-and-set failed.
WRONG_LAST_SEQUENCE = (10071, 10164)
#: JetStream deduplicates messages of one stream by this header within its window.
MSG_ID = "Nats-Msg-Id"
#: The micro framework's error headers (any `nats micro` service replies with them).
SERVICE_ERROR = "Nats-Service-Error"
SERVICE_ERROR_CODE = "Nats-Service-Error-Code"
#: A server status on a message without payload (nats-py's header names): `503` on the
#: reply subject of a message nobody subscribes to ("no responders").
STATUS_HEADER = "Status"
DESCRIPTION_HEADER = "Description"
#: Added by the NATS server to a request that crossed an account import: JSON describing
#: the requester (account, user, name, ...).
REQUEST_INFO_HEADER = "Nats-Request-Info"


def is_kv_delete(headers: Mapping[str, str] | None) -> bool:
    """A KV entry that says the key is gone: a delete, a purge, or a server limit marker
    (a per-key TTL that expired)."""
    if not headers:
        return False
    return headers.get(KV_OP) in (KV_DEL, KV_PURGE) or KV_MARKER_REASON in headers


# --- the nats-cron API --------------------------------------------------------------------------

PREFIX = "nats-cron"

# Request subjects (SPEC §4: the Go version's, then ours).
LIST = f"{PREFIX}.jobs.list"
GET = f"{PREFIX}.jobs.get"
CREATE = f"{PREFIX}.jobs.create"
UPDATE = f"{PREFIX}.jobs.update"
DELETE = f"{PREFIX}.jobs.delete"
DELETE_PATTERN = f"{PREFIX}.jobs.delete.pattern"
PAUSE = f"{PREFIX}.jobs.pause"
RESUME = f"{PREFIX}.jobs.resume"
TRIGGER = f"{PREFIX}.jobs.trigger"
HISTORY = f"{PREFIX}.jobs.history"
APPLY = f"{PREFIX}.jobs.apply"
STATUS = f"{PREFIX}.status"

# A change made through the API is published, by the instance that made it, on
# `nats-cron.changes.<job subject>` (JSON: change, subject, revision, time, instance,
# requester, job). Subscribe to `nats-cron.changes.>` or `nats-cron.changes.<pattern>`.
CHANGES_PREFIX = f"{PREFIX}.changes"
# Every run outcome is an event on `<events prefix>.<job subject>` (default prefix
# `nats-cron.events`, a setting: deployments sharing a server each take their own), kept in
# the events stream (history.History); the `status` reply names the prefix in use
# (`events_subject`, and `history_subject` as before).
EVENTS_PREFIX = f"{PREFIX}.events"
# A run whose retries are exhausted is published on `nats-cron.dead.<job subject>`, with
# its last attempt's payload and headers plus its outcome and error.
DEAD_PREFIX = f"{PREFIX}.dead"

# Request header: validate and report what would happen, store nothing ("true").
DRY_RUN_HEADER = "Nats-Cron-Dry-Run"


def changes_subject(subject_or_pattern: str) -> str:
    return f"{CHANGES_PREFIX}.{subject_or_pattern}"


def dead_subject(job_subject: str) -> str:
    return f"{DEAD_PREFIX}.{job_subject}"


__all__ = [
    "APPLY",
    "CHANGES_PREFIX",
    "CREATE",
    "DEAD_PREFIX",
    "DELETE",
    "DELETE_PATTERN",
    "DESCRIPTION_HEADER",
    "DRY_RUN_HEADER",
    "EVENTS_PREFIX",
    "EXPECTED_LAST",
    "GET",
    "HISTORY",
    "KV_DEL",
    "KV_MARKER_REASON",
    "KV_OP",
    "KV_PURGE",
    "LIST",
    "MSG_ID",
    "PAUSE",
    "PREFIX",
    "REQUEST_INFO_HEADER",
    "RESUME",
    "SERVICE_ERROR",
    "SERVICE_ERROR_CODE",
    "STATUS",
    "STATUS_HEADER",
    "TRIGGER",
    "UPDATE",
    "WRONG_LAST_SEQUENCE",
    "changes_subject",
    "dead_subject",
    "is_kv_delete",
]
