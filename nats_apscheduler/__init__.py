"""nats-cron: a distributed cron scheduler for NATS built on APScheduler 3 and JetStream KV."""

from importlib.metadata import PackageNotFoundError, version

from loguru import logger

from nats_apscheduler.cron import StandardCronTrigger, parse_cron
from nats_apscheduler.errors import NatsCronError, SpecError, StoreError, WriteConflict
from nats_apscheduler.spec import EveryTrigger, JobSpec, parse_job
from nats_apscheduler.store import JetStreamJobStore

try:
    __version__ = version("nats-cron")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

# A library never configures log sinks; applications enable us (the CLI does).
logger.disable("nats_apscheduler")

__all__ = [
    "EveryTrigger",
    "JetStreamJobStore",
    "JobSpec",
    "NatsCronError",
    "SpecError",
    "StandardCronTrigger",
    "StoreError",
    "WriteConflict",
    "__version__",
    "parse_cron",
    "parse_job",
]
