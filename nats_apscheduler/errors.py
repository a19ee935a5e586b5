"""The error tree of nats-cron; every exception the package raises on purpose is here.

    NatsCronError
    ├── SpecError            a job document or schedule is invalid (field + rule)
    │   └── ConfigError      a setting is invalid, or contradicts the deployment's
    ├── StoreError           the JetStream job store could not do what was asked
    │   ├── RecordError      a KV record cannot be decoded or names a forbidden function
    │   └── WriteConflict    a compare-and-set write lost against another writer
    ├── BridgeError          a blocking call was made where it would deadlock the event loop
    ├── NotLeaderError       a fire was attempted without a valid lease
    └── DataDirInUse         another embedded nats-server holds this data directory

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


class DataDirInUse(NatsCronError, RuntimeError):
    """Another embedded nats-server (or one whose parent died) uses this data directory."""


class ConfigError(SpecError):
    """A setting is invalid or contradicts the deployment (e.g. its number of shards)."""
