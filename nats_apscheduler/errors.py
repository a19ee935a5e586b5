"""The error tree of nats-cron; every exception the package raises on purpose is here.

    NatsCronError
    ├── SpecError            a job document or schedule is invalid (field + rule)
    ├── ConfigError          a setting or flag is invalid, or contradicts the deployment
    ├── StoreError           the JetStream job store could not do what was asked
    │   ├── RecordError      a KV record cannot be decoded or names a forbidden function
    │   └── WriteConflict    a compare-and-set write lost against another writer
    ├── BridgeError          a blocking call was made where it would deadlock the event loop
    ├── NotLeaderError       a fire was attempted without a valid lease
    ├── MarkTakenOver        another leader wrote a shard's progress mark: this one is deposed
    ├── DataDirInUse         another embedded nats-server holds this data directory
    ├── NotFound             no job with that subject
    ├── Conflict             the job exists already, or another writer changed it
    ├── ApiError             an API request failed: `code` (HTTP-like) and `message`
    └── NoService            nobody answered an API request (no instance, or a timeout)

APScheduler's own `ConflictingIdError` / `JobLookupError` are raised where its store
contract asks for them.
"""

from __future__ import annotations


class NatsCronError(Exception):
    """Base class of every error raised by nats-cron on purpose."""


class SpecError(NatsCronError, ValueError):
    """A job document is invalid. `field` is the dotted path, `rule` what is wrong."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}" if field else rule)


class StoreError(NatsCronError):
    """The JetStream job store could not do what was asked."""


class RecordError(StoreError):
    """A stored record cannot be decoded, or names a function off the allow-list."""


class WriteConflict(StoreError):
    """A compare-and-set write lost against a concurrent writer."""


class BridgeError(NatsCronError, RuntimeError):
    """A blocking call was made on the event loop thread, where it would deadlock."""


class NotLeaderError(NatsCronError):
    """A fire was attempted by an instance that cannot prove it holds the lease."""


class MarkTakenOver(NatsCronError):
    """Another leader wrote the progress mark (a compare-and-set found a newer revision):
    the instance that tried is deposed for that shard and stops firing it."""


class DataDirInUse(NatsCronError, RuntimeError):
    """Another embedded nats-server (or one whose parent died) uses this data directory."""


class ConfigError(NatsCronError, ValueError):
    """A setting or flag is invalid, or contradicts the deployment (e.g. its number of
    shards). `field` names it (`NATS_CRON_SHARDS`, `--lease-ttl`), `rule` what is wrong."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}" if field else rule)


class NotFound(NatsCronError):
    """No job with that subject."""


class Conflict(NatsCronError):
    """The job exists already, or another writer changed it concurrently."""


class ApiError(NatsCronError):
    """An API request failed: raised by the service's handlers (answered as an error reply)
    and by `CronClient` when the service answers with one. `code` is HTTP-like (400, 404,
    409, 413, 500, 503)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NoService(NatsCronError):
    """Nobody answered: no nats-cron instance is running, or it timed out."""
