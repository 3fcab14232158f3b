"""The server's log: one line per RPC (method, status, duration, request id), one per operation
event (queued, started, finished or failed, with its id and kind), start and stop; as text or
JSON lines on stderr. Other libraries speak only at WARNING and above (onnxscript, torch and
friends log at INFO on their own, which drowned the server's lines)."""
from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
OURS = "advex"
# fields a record may carry (logging's `extra`), shown after the message in text and as keys in JSON
FIELDS = ("request_id", "method", "code", "duration_ms", "peer", "operation_id", "kind", "state", "error")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
REQUEST_ID_HEADER = "x-request-id"


def request_id(metadata) -> str:
    """The client's x-request-id when it sent a plain one (at most 64 of [A-Za-z0-9._:-]), else a
    new one: the id the RPC's log line and its trailing metadata carry."""
    for key, value in metadata or ():
        if key.lower() == REQUEST_ID_HEADER and isinstance(value, str) and REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]


class _OnlyOurs(logging.Filter):
    """advex's records at the configured level; everyone else's from WARNING up."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == OURS or record.name.startswith(OURS + ".")
        return record.levelno >= (self.level if ours else max(self.level, logging.WARNING))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={_text(getattr(record, k))}" for k in FIELDS if hasattr(record, k))
        return f"{line} {extra}" if extra else line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601 UTC), level, logger, message, the FIELDS present,
    and the traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for k in FIELDS:
            if hasattr(record, k):
                out[k] = getattr(record, k)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _text(value) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c.isspace() or c in '"=' for c in text)) else text


def setup(level: str = "info", fmt: str = "text", stream=None) -> logging.Handler:
    """Route every log record to one stderr handler in `fmt`, filtered (see _OnlyOurs); replaces
    handlers an earlier call installed. Returns the handler."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {LEVELS}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_OnlyOurs(getattr(logging, level.upper())))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "advex", False)]:
        root.removeHandler(old)
    handler.advex = True
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))  # others are held to WARNING by the handler's filter
    logging.captureWarnings(True)
    return handler
