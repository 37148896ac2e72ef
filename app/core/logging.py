"""JSON logs: one object per line on stdout, nothing from request bodies."""

from __future__ import annotations

import logging
import sys
import time
from functools import lru_cache
from typing import Any

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


@lru_cache(maxsize=4)
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds; the date-time part is formatted once per second."""
    second = int(created)
    return f"{_second(second)}.{int((created - second) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object; ``extra={...}`` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str) -> None:
    """Route the root, uvicorn and app loggers through one JSON handler on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Requests are logged by app.core.middleware; uvicorn's own access log would duplicate them.
    logging.getLogger("uvicorn.access").disabled = True


class AccessLog:
    """The per-request log line, written straight to stdout in the format of ``JsonFormatter``.

    A ``logging`` call costs ~35 µs of event-loop CPU (record, handler lock, formatter), about a
    tenth of a one-image digit request; this writes the same JSON line for a fraction of that.
    It honours the ``app.access`` logger's level and ``disabled`` flag.
    """

    def __init__(self, name: str = "app.access") -> None:
        self.logger = logging.getLogger(name)
        self.name = name

    def write(self, fields: dict[str, Any]) -> None:
        logger = self.logger
        if logger.disabled or not logger.isEnabledFor(logging.INFO):
            return
        now = time.time()
        entry = {"ts": _timestamp(now), "level": "info", "logger": self.name, "msg": "request"}
        entry.update(fields)
        out = sys.stdout
        out.write(orjson.dumps(entry, default=str).decode() + "\n")
        out.flush()
