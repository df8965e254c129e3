"""Logging: plain text or JSON lines, with structured fields passed as ``extra``.

What is logged is chosen where it is logged: a denial carries action, rule, reason and the
*hashed* subject; admin changes carry the actor's name. Nothing here ever receives a raw IP, a
token or a request body, so nothing can print one.

A log line is one line whatever a client sends. Both formats escape control characters (C0,
DEL, C1 and the Unicode line and paragraph separators, as ``\\xNN`` / ``\\uNNNN``) in the
message and in every field, so a ``%0a`` in a path cannot forge a line; in text, a traceback's
lines are indented, so none of them can pass for a record either.

Lines about what clients did wrong (``client_error``: a refused form, a malformed HTTP
request) are sampled: at most ``CLIENT_ERRORS_PER_SECOND`` of each kind in any second, and
the next line of a kind says how many of it were left out (``suppressed``). A flood of bad
requests costs a few lines a second, not one each.

aiohttp's own loggers are filtered (``configure_logging``): its access log never passes (it
would print client addresses and request lines), and its server log says of a request it
could not parse only that it was malformed, with the parser's error class: never the peer's
address, the raw request line or header, or a traceback.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any, Literal

import msgspec
from aiohttp.http_exceptions import HttpProcessingError

__all__ = ["CLIENT_ERRORS_PER_SECOND", "AiohttpFilter", "JsonFormatter", "Sampler",
           "TextFormatter", "client_error", "client_errors", "configure_logging", "decision_log",
           "escape"]

LogFormat = Literal["text", "json"]
# attributes every LogRecord has; anything else on a record came in through `extra`
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
_encode = msgspec.json.Encoder().encode
# what a log line must never hold raw: C0, DEL, C1, and the Unicode line/paragraph separators
_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROL |= {0x2028: "\\u2028", 0x2029: "\\u2029"}
TRACEBACK_INDENT = "    "
CLIENT_ERRORS_PER_SECOND = 5
MAX_KINDS = 10_000  # kinds remembered at once; past that, counting starts over

decision_log = logging.getLogger("ratekeeper.decisions")


def escape(text: str) -> str:
    """``text`` with its control characters written as escapes: always one line."""
    if text.isprintable():  # (the common case; isprintable is False for each of them)
        return text
    return text.translate(_CONTROL)


def _escaped(value: Any) -> Any:
    """A field's value with every string in it escaped (dicts and lists walked)."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {escape(str(k)): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return escape(str(value))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        body: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": escape(record.getMessage()),
        }
        for key, value in _fields(record).items():
            body[escape(key)] = _escaped(value)
        if record.exc_info:
            lines = self.formatException(record.exc_info).splitlines()
            body["exc"] = "\n".join(escape(line) for line in lines)
        return _encode(body).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line itself, message and fields escaped, fields appended as key=value."""
        record.message = escape(record.message)
        line = super().formatMessage(record)
        extra = [f"{escape(key)}={escape(str(value))}" for key, value in _fields(record).items()]
        return f"{line} {' '.join(extra)}" if extra else line

    def formatException(self, ei: Any) -> str:
        """The traceback with every line indented (and escaped)."""
        lines = super().formatException(ei).splitlines()
        return "\n".join(TRACEBACK_INDENT + escape(line) for line in lines)

    def formatStack(self, stack_info: str) -> str:
        """A stack, like a traceback, indented."""
        return "\n".join(TRACEBACK_INDENT + escape(line) for line in stack_info.splitlines())


class Sampler:
    """Lets at most ``per_second`` lines of each kind through in any one-second window.

    ``admit`` says whether a line may be written and, if so, how many lines of its kind were
    held back since the last one written.
    """

    __slots__ = ("_clock", "_seen", "max_kinds", "per_second")

    def __init__(self, per_second: int = CLIENT_ERRORS_PER_SECOND, *,
                 clock: Callable[[], float] = time.monotonic, max_kinds: int = MAX_KINDS
                 ) -> None:
        self.per_second = per_second
        self.max_kinds = max_kinds
        self._clock = clock
        self._seen: dict[Hashable, list[float]] = {}  # kind -> [window start, lines, held]

    def admit(self, kind: Hashable) -> int | None:
        """None: hold this line back (it is counted); else write it, with this many of its
        kind held back before it."""
        now = self._clock()
        seen = self._seen.get(kind)
        if seen is None:
            if len(self._seen) >= self.max_kinds:
                self._seen.clear()
            seen = self._seen[kind] = [now, 0, 0]
        elif now - seen[0] >= 1.0:
            seen[0], seen[1] = now, 0
        if seen[1] >= self.per_second:
            seen[2] += 1
            return None
        seen[1] += 1
        held, seen[2] = int(seen[2]), 0
        return held


client_errors = Sampler()  # every client-error line of this process goes through it


def client_error(logger: logging.Logger, kind: str, msg: str, *args: object,
                 level: int = logging.WARNING) -> None:
    """Log a line about a client's mistake, sampled per ``kind`` (``Sampler``)."""
    if not logger.isEnabledFor(level):
        return
    held = client_errors.admit(kind)
    if held is None:
        return
    logger.log(level, msg, *args, extra={"suppressed": held} if held else None, stacklevel=2)


class AiohttpFilter(logging.Filter):
    """aiohttp's loggers, made safe to write: see the module docstring."""

    def __init__(self, sampler: Sampler | None = None) -> None:
        super().__init__()
        self.sampler = sampler or client_errors

    def filter(self, record: logging.LogRecord) -> bool:
        """False to drop ``record``; rewrites what it keeps."""
        if record.name == "aiohttp.access":
            return False
        if record.msg != "Error handling request from %s":
            return True
        record.msg, record.args = "Error handling request", ()
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            # the parser's message quotes the bytes it choked on: only the class is kept
            name = type(error).__name__
            held = self.sampler.admit(("malformed-http", name))
            if held is None:
                return False
            record.msg, record.args = "malformed HTTP request refused (%s)", (name,)
            record.exc_info, record.exc_text = None, None
            if record.levelno > logging.WARNING:  # the client's mistake, not an error of ours
                record.levelno, record.levelname = logging.WARNING, "WARNING"
            if held:
                vars(record)["suppressed"] = held
        return True


def configure_logging(fmt: LogFormat = "text", level: str = "INFO") -> None:
    """Send ratekeeper's logs to stderr in ``fmt``; replaces earlier handlers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("aiohttp.access", "aiohttp.server"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, AiohttpFilter) for f in logger.filters):
            logger.addFilter(AiohttpFilter())
    # aiohttp's access log would print client addresses: it stays off (runner passes None)
    logging.getLogger("aiohttp.access").disabled = True
