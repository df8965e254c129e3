"""Logging: plain text or JSON lines, with structured fields passed as ``extra``.

What is logged is chosen where it is logged: a denial carries action, rule, reason and the
*hashed* subject; admin changes carry the actor's name. Nothing here ever receives a raw IP, a
token or a request body, so nothing can print one.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

import msgspec

__all__ = ["JsonFormatter", "configure_logging", "decision_log"]

LogFormat = Literal["text", "json"]
# attributes every LogRecord has; anything else on a record came in through `extra`
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
_encode = msgspec.json.Encoder().encode

decision_log = logging.getLogger("ratekeeper.decisions")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        body: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                body[key] = value
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return _encode(body).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` with its extra fields appended as key=value."""
        line = super().format(record)
        extra = [f"{k}={v}" for k, v in vars(record).items()
                 if k not in _STANDARD and not k.startswith("_")]
        return f"{line} {' '.join(extra)}" if extra else line


def configure_logging(fmt: LogFormat = "text", level: str = "INFO") -> None:
    """Send ratekeeper's logs to stderr in ``fmt``; replaces earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would print client addresses: it stays off (runner passes None).
    logging.getLogger("aiohttp.access").disabled = True
    # and its server log names the peer of a request it could not parse
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _NoPeerAddress) for f in server_log.filters):
        server_log.addFilter(_NoPeerAddress())


class _NoPeerAddress(logging.Filter):
    """aiohttp's "Error handling request from <address>", without the address."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Error handling request from %s":
            record.msg, record.args = "Error handling request", ()
        return True
