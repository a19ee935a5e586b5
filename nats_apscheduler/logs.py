"""Logging for applications (the CLI and `serve`); the library never calls this.

JSON lines for machines (`time`, `level`, `msg`, then the bound context: instance_id,
subject, epoch, ...; an error's traceback in `traceback`) or readable text for a person
at a terminal. APScheduler's standard-library logging is routed into the same sink. A
warning repeated within `repeat_window` seconds (a follower's reconnect attempts while
NATS is down) is written once; its next occurrence after the window carries the number
left out (`repeated`). Credentials are never bound into log records; URLs are logged
redacted.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

from loguru import logger

_LEVELS = {
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
}
REPEAT_WINDOW = 10.0  # seconds


class RepeatFilter:
    """Lets the first of identical warnings through, then none for `window` seconds;
    the first one after that says how many were left out (`extra["repeated"]`).

    Identical: same level, logger function and message text. Errors always pass (each
    one counts); so does everything below warning.
    """

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._seen: dict[tuple[str, str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def __call__(self, record: Any) -> bool:
        if record["level"].name != "WARNING" or self.window <= 0:
            return True
        key = (record["level"].name, record["function"], record["message"])
        now = self._clock()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last[0] < self.window:
                self._seen[key] = (last[0], last[1] + 1)
                return False
            self._seen[key] = (now, 0)
            if len(self._seen) > 1000:  # forget the oldest: messages carry varying text
                oldest = sorted(self._seen.items(), key=lambda item: item[1][0])[:500]
                for stale, _ in oldest:
                    del self._seen[stale]
        if last is not None and last[1]:
            record["extra"]["repeated"] = last[1]
        return True


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
            kind, value, tb = record["exception"]
            line["error"] = repr(value)
            line["traceback"] = "".join(traceback.format_exception(kind, value, tb)).rstrip()
        stream.write(json.dumps(line, ensure_ascii=False) + "\n")
        stream.flush()

    return sink


def _text_format(record: Any) -> str:
    """`12:00:00.123 INFO    job created  subject=a.b requester_account=APP`."""
    context = " ".join(
        f"{key}={{extra[{key}]}}" for key in record["extra"] if key not in ("instance_id",)
    )
    line = "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}"
    if context:
        line += "  <dim>" + context + "</dim>"
    return line + "\n{exception}"


class _Intercept(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.bind(logger=record.name).log(level, record.getMessage())


def configure(
    level: str = "info",
    stream: TextIO | None = None,
    log_format: str = "json",
    repeat_window: float = REPEAT_WINDOW,
    **context: Any,
) -> None:
    """Send every log record, ours and APScheduler's, to `stream` (stderr): JSON lines,
    or text (`log_format="text"`, coloured on a terminal)."""
    out = stream or sys.stderr
    logger.remove()
    logger.enable("nats_apscheduler")
    logger.configure(extra=context)
    repeats = RepeatFilter(repeat_window)
    if log_format == "text":
        logger.add(
            out,
            level=_LEVELS[level.lower()],
            format=_text_format,
            filter=repeats,
            colorize=out.isatty(),
            backtrace=False,
            diagnose=False,  # variable values in tracebacks could hold secrets
        )
    else:
        logger.add(_json_sink(out), level=_LEVELS[level.lower()], filter=repeats)
    logging.basicConfig(handlers=[_Intercept()], level=logging.WARNING, force=True)
