"""Wire facts of the nats-cron API, written once for the service and its client: the
request subjects, the subjects live events are published on, and the headers.

Every subject is under `nats-cron.`, which no job may target (`spec.validate_subject`).
"""

from __future__ import annotations

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
# Run history records go to `nats-cron.history.<stream>.<job subject>` (fire.History);
# the `status` reply names the prefix in use (`history_subject`).

# Request header: validate and report what would happen, store nothing ("true").
DRY_RUN_HEADER = "Nats-Cron-Dry-Run"
# Added by the NATS server to a request that crossed an account import: JSON describing
# the requester (account, user, name, ...).
REQUEST_INFO_HEADER = "Nats-Request-Info"


def changes_subject(subject_or_pattern: str) -> str:
    return f"{CHANGES_PREFIX}.{subject_or_pattern}"
