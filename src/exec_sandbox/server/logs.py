"""Structured logs of ``sbx serve``: one JSON object per line (``--log-format json``) or text.

Every line has ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``event`` (the message). A line
logged while a request is served also has that request's ``request_id`` (the client's
``X-Request-Id`` when it is a short token, else a fresh one; echoed in the response header), and
``sandbox_id`` / ``owner`` once known. ``owner`` is a 12-hex-digit prefix of the API key's sha256,
never the key. Each request ends with one ``event: "request"`` line (this is the access log; uvicorn's
own is turned off, its other loggers go through the same handler) with ``method``, ``path``,
``status`` and ``duration_ms``. Request bodies, headers and tokens are never logged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import sys
import time
from datetime import UTC, datetime
from typing import Any, Final, Literal

__all__ = [
    "ACCESS_LOGGER",
    "LogFormat",
    "RequestLog",
    "configure_logging",
    "default_log_format",
    "owner_tag",
]

LogFormat = Literal["json", "text"]
ACCESS_LOGGER: Final = "exec_sandbox.server.access"
FIELDS: Final = ("request_id", "sandbox_id", "owner", "method", "path", "status", "duration_ms")
_REQUEST_ID_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_CURRENT: contextvars.ContextVar[RequestLog | None] = contextvars.ContextVar("sbx_request", default=None)
_SANDBOX_PATH_RE: Final = re.compile(r"^(?:/v2)?/sandboxes/([A-Za-z0-9_-]{1,64})(?:/|$)")


def owner_tag(owner: str | None) -> str | None:
    """What the logs say about a key: a prefix of its sha256 digest (``owner`` is that digest)."""
    return owner[:12] if owner else None


class RequestLog:
    """The loggable facts of one request; current (a context variable) while it is served."""

    __slots__ = ("method", "owner", "path", "request_id", "sandbox_id", "started", "status")

    def __init__(self, method: str, path: str, sandbox_id: str | None, given_id: str | None) -> None:
        self.method = method
        self.path = path
        if sandbox_id is None:
            found = _SANDBOX_PATH_RE.match(path)
            sandbox_id = found.group(1) if found else None
        self.sandbox_id = sandbox_id
        ok = given_id is not None and _REQUEST_ID_RE.match(given_id)
        self.request_id = given_id if ok and given_id else secrets.token_hex(8)
        self.owner: str | None = None
        self.status = 0
        self.started = time.perf_counter()

    def enter(self) -> contextvars.Token[RequestLog | None]:
        return _CURRENT.set(self)

    @staticmethod
    def leave(token: contextvars.Token[RequestLog | None]) -> None:
        _CURRENT.reset(token)

    def set_owner(self, owner: str) -> None:
        self.owner = owner_tag(owner)

    def fields(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "sandbox_id": self.sandbox_id, "owner": self.owner}

    def finish(self) -> None:
        """The access-log line of this request."""
        duration_ms = round((time.perf_counter() - self.started) * 1000.0, 1)
        logging.getLogger(ACCESS_LOGGER).info(
            "%s %s %s %.1f ms",
            self.method,
            self.path,
            self.status,
            duration_ms,
            extra={"event": "request", "method": self.method, "path": self.path, "status": self.status,
                   "duration_ms": duration_ms},
        )


def _facts(record: logging.LogRecord) -> dict[str, Any]:
    current = _CURRENT.get()
    facts: dict[str, Any] = current.fields() if current is not None else {}
    for name in FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            facts[name] = value
    return {k: v for k, v in facts.items() if v is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or record.getMessage(),
        }
        if line["event"] != record.getMessage():
            line["message"] = record.getMessage()
        line.update(_facts(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        facts = _facts(record)
        if getattr(record, "event", None) == "request":
            facts = {k: v for k, v in facts.items() if k in ("request_id", "sandbox_id", "owner")}
        return text + "".join(f" {k}={v}" for k, v in facts.items())


def default_log_format() -> LogFormat:
    """Text for a person at a terminal, JSON for a log collector."""
    return "text" if sys.stderr.isatty() else "json"


def configure_logging(fmt: LogFormat, level: str = "info") -> None:
    """Route every logger (ours, uvicorn's) to one stderr handler with ``fmt``; idempotent."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
