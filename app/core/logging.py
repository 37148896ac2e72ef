"""JSON logs: one object per line on stdout, nothing from request bodies, no credentials.

Query-string values that grant access (``session_id`` and ``token`` of an echo resume URL,
``access_token`` and ``key`` API keys) are replaced by ``[redacted]`` in every record, uvicorn's
included (it logs each WebSocket handshake's path with its query string).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from functools import lru_cache
from typing import Any

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}
SECRET_PARAMS = ("access_token", "api_key", "key", "session_id", "token")
_SECRET_QUERY = re.compile(rf"([?&;](?:{'|'.join(SECRET_PARAMS)})=)[^&#\s\"']*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the values of the ``SECRET_PARAMS`` query parameters replaced."""
    return _SECRET_QUERY.sub(r"\1[redacted]", text) if "=" in text else text


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
            "pid": record.process,  # which worker (WEB_CONCURRENCY > 1)
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
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
        entry = {
            "ts": _timestamp(now),
            "level": "info",
            "logger": self.name,
            "pid": os.getpid(),  # as JsonFormatter: which worker
            "msg": "request",
        }
        entry.update(fields)
        out = sys.stdout
        out.write(orjson.dumps(entry, default=str).decode() + "\n")
        out.flush()
