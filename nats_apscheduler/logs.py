"""JSON-lines logging for applications (the CLI and `serve`); the library never calls this.

One line per record: `time`, `level`, `msg`, then the bound context (instance_id,
subject, epoch, ...). APScheduler's standard-library logging is routed into the same
sink. Credentials are never bound into log records; URLs are logged redacted.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

from loguru import logger

_LEVELS = {
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
}


def _json_sink(stream: TextIO) -> Any:
    def sink(message: Any) -> None:
        record = message.record
        line: dict[str, Any] = {
            "time": record["time"].isoformat(timespec="milliseconds"),
            "level": record["level"].name.lower(),
            "msg": record["message"],
        }
        for key, value in record["extra"].items():
            line[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record["exception"] is not None:
            line["error"] = repr(record["exception"].value)
        stream.write(json.dumps(line, ensure_ascii=False) + "\n")
        stream.flush()

    return sink


class _Intercept(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.bind(logger=record.name).log(level, record.getMessage())


def configure(level: str = "info", stream: TextIO | None = None, **context: Any) -> None:
    """Send every log record, ours and APScheduler's, as JSON lines to `stream` (stderr)."""
    logger.remove()
    logger.enable("nats_apscheduler")
    logger.configure(extra=context)
    logger.add(_json_sink(stream or sys.stderr), level=_LEVELS[level.lower()])
    logging.basicConfig(handlers=[_Intercept()], level=logging.WARNING, force=True)
