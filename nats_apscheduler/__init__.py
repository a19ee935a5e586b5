"""nats-cron: a distributed cron scheduler for NATS built on APScheduler 3 and JetStream KV.

The public API, used by the CLI and by applications that embed the scheduler or use the
job store as an APScheduler plugin.
"""

from importlib.metadata import PackageNotFoundError, version

from loguru import logger

from nats_apscheduler.client import CronClient, Feed
from nats_apscheduler.connection import connect
from nats_apscheduler.cron import StandardCronTrigger, fire_times, parse_cron
from nats_apscheduler.durations import format_duration, parse_duration
from nats_apscheduler.embedded import EmbeddedNatsServer
from nats_apscheduler.errors import (
    ApiError,
    ConfigError,
    Conflict,
    DataDirInUse,
    NatsCronError,
    NoService,
    NotFound,
    SpecError,
    StoreError,
    WriteConflict,
)
from nats_apscheduler.jobs import subject_matches
from nats_apscheduler.logs import configure as configure_logging
from nats_apscheduler.server import NatsCron
from nats_apscheduler.settings import Connection, Settings, redact_url
from nats_apscheduler.shards import shard_of
from nats_apscheduler.spec import EveryTrigger, JobSpec, parse_job
from nats_apscheduler.store import JetStreamJobStore

try:
    __version__ = version("nats-cron")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

# A library never configures log sinks; applications enable us (the CLI does).
logger.disable("nats_apscheduler")

__all__ = [
    "ApiError",
    "ConfigError",
    "Conflict",
    "Connection",
    "CronClient",
    "DataDirInUse",
    "EmbeddedNatsServer",
    "EveryTrigger",
    "Feed",
    "JetStreamJobStore",
    "JobSpec",
    "NatsCron",
    "NatsCronError",
    "NoService",
    "NotFound",
    "Settings",
    "SpecError",
    "StandardCronTrigger",
    "StoreError",
    "WriteConflict",
    "__version__",
    "configure_logging",
    "connect",
    "fire_times",
    "format_duration",
    "parse_cron",
    "parse_duration",
    "parse_job",
    "redact_url",
    "shard_of",
    "subject_matches",
]
