"""Protocol facts, written once: header names, JetStream error codes, nats-cron's subjects.

KV names come from nats-py's own `nats.js.kv` constants; what nats-py does not name
(compare-and-set headers, the server's wrong-last-sequence codes, the micro error headers)
is named here. Every API subject is built by `api_subject()`, shared by service and client.
"""

from __future__ import annotations

from collections.abc import Mapping

from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE

__all__ = [
    "API_PREFIX",
    "EXPECTED_LAST",
    "HISTORY_PREFIX",
    "KV_DEL",
    "KV_MARKER_REASON",
    "KV_OP",
    "KV_PURGE",
    "MSG_ID",
    "SERVICE_ERROR",
    "SERVICE_ERROR_CODE",
    "WRONG_LAST_SEQUENCE",
    "api_subject",
    "is_kv_delete",
]

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

API_PREFIX = "nats-cron"
HISTORY_PREFIX = "nats-cron.history"


def api_subject(name: str) -> str:
    """The subject of an API endpoint: `jobs.list` -> `nats-cron.jobs.list`."""
    return f"{API_PREFIX}.{name}"


def is_kv_delete(headers: Mapping[str, str] | None) -> bool:
    """A KV entry that says the key is gone: a delete, a purge, or a server limit marker
    (a per-key TTL that expired)."""
    if not headers:
        return False
    return headers.get(KV_OP) in (KV_DEL, KV_PURGE) or KV_MARKER_REASON in headers
