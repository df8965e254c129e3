"""What both clients share: the fail policy, the errors, ``Check``, and reading answers.

When the sidecar cannot be asked in time (refused, timed out, a 5xx, an unreadable answer) the
action's fail mode decides, on the client: ``"open"`` allows, ``"closed"`` denies as rate limited
(retry in 1 s), ``"raise"`` raises ``SidecarUnavailable``. Such a decision is a
``FallbackDecision``: ``degraded`` is true and ``error`` says what went wrong. A 4xx means the
request itself is wrong (an unknown action, a missing subject): that is never papered over,
it raises ``RequestRejected`` with the sidecar's sentence.

The origin's own calls (``state``, ``clear``, ``flags``) need the sidecar's origin token
(``origin_token``, the sidecar's ``RATEKEEPER_ORIGIN_TOKEN``). ``flags()`` is kept for
``flags_ttl`` seconds, and when the sidecar cannot be asked the last copy is returned marked
``stale`` (none yet: no flag is on).

Errors::

    RatekeeperError
    └── ClientError
        ├── SidecarUnavailable   could not be asked in time (only raised for fail="raise")
        └── RequestRejected      the sidecar answered 4xx; .status and the sentence
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import msgspec

from ratekeeper.api.wire import (
    BatchResponse,
    ClearResult,
    Decision,
    ErrorBody,
    FlagStates,
    RefundResult,
)
from ratekeeper.errors import RatekeeperError

__all__ = [
    "CLEAR_UNAVAILABLE",
    "DEFAULT_FLAGS_TTL",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "NOTHING_TAKEN",
    "UNAVAILABLE",
    "BaseClient",
    "Check",
    "ClientError",
    "FailMode",
    "FallbackDecision",
    "RequestRejected",
    "SidecarUnavailable",
    "log",
]

log = logging.getLogger("ratekeeper.client")

FailMode = Literal["open", "closed", "raise"]
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 0.05  # seconds, the whole call: connect, send, answer
DEFAULT_FLAGS_TTL = 1.0  # seconds a flags() answer is reused (the sidecar syncs each second)
FAIL_MODES = ("open", "closed", "raise")

T = TypeVar("T")


class ClientError(RatekeeperError):
    """Base class of the client's errors."""


class SidecarUnavailable(ClientError):
    """The sidecar could not be asked in time, or answered with a 5xx or garbage."""


class RequestRejected(ClientError):
    """The sidecar refused the request itself (4xx): ``status`` and its one-sentence reason."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class FallbackDecision(Decision, frozen=True, kw_only=True):
    """A decision the client made by itself because the sidecar could not be asked."""

    error: str = ""


class Check:
    """One check of a batch: the same arguments as ``check``."""

    __slots__ = ("action", "body")

    def __init__(self, action: str, ip: str | None = None, *, user: str | None = None,
                 cost: int = 1, ip_hash: str | None = None, **subjects: str) -> None:
        self.action = action
        body: dict[str, Any] = {"action": action, "ip": ip, "ip_hash": ip_hash, "user": user,
                                "cost": cost, **subjects}
        self.body = {k: v for k, v in body.items() if v is not None}


class BaseClient:
    """What both clients share: the URL, the deadline, the fail policy, the wire format."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float = DEFAULT_TIMEOUT,
                 fail: Mapping[str, FailMode] | None = None,
                 default_fail: FailMode = "open", origin_token: str | None = None,
                 flags_ttl: float = DEFAULT_FLAGS_TTL) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if flags_ttl < 0:
            raise ValueError("flags_ttl must not be negative")
        for action, mode in {**(fail or {}), "": default_fail}.items():
            if mode not in FAIL_MODES:
                raise ValueError(f"fail mode of '{action or 'default'}' must be one of "
                                 + ", ".join(FAIL_MODES))
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.fail = dict(fail or {})
        self.default_fail = default_fail
        self._encode = msgspec.json.Encoder().encode
        self._decision = msgspec.json.Decoder(Decision)
        self._batch = msgspec.json.Decoder(BatchResponse)
        self._refund = msgspec.json.Decoder(RefundResult)
        self._error = msgspec.json.Decoder(ErrorBody)
        self._clear = msgspec.json.Decoder(ClearResult)
        self._flag_states = msgspec.json.Decoder(FlagStates)
        self.origin_token = origin_token
        self.flags_ttl = flags_ttl
        self._flags: tuple[float, FlagStates] | None = None  # (monotonic time read, answer)

    def origin_headers(self) -> dict[str, str]:
        """The origin calls' headers: the JSON type and the origin token."""
        headers = {"Content-Type": "application/json"}
        if self.origin_token:
            headers["Authorization"] = f"Bearer {self.origin_token}"
        return headers

    def cached_flags(self) -> FlagStates | None:
        """The last flags() answer while it is younger than ``flags_ttl``."""
        kept = self._flags
        if kept is not None and time.monotonic() - kept[0] < self.flags_ttl:
            return kept[1]
        return None

    def keep_flags(self, flags: FlagStates) -> FlagStates:
        """Remember a fresh flags() answer."""
        self._flags = (time.monotonic(), flags)
        return flags

    def stale_flags(self, error: SidecarUnavailable) -> FlagStates:
        """What flags() answers when the sidecar cannot be asked: the last copy, marked."""
        log.warning("ratekeeper unavailable, flags as last known: %s", error)
        kept = self._flags
        return FlagStates(flags=[] if kept is None else kept[1].flags, stale=True)

    def fail_mode(self, action: str) -> FailMode:
        """What decides ``action`` when the sidecar cannot be asked."""
        return self.fail.get(action, self.default_fail)

    def fallback(self, action: str, error: SidecarUnavailable) -> Decision:
        """The action's fail mode applied: a FallbackDecision, or the error raised."""
        mode = self.fail_mode(action)
        log.warning("ratekeeper unavailable, failing %s for %s: %s", mode, action, error)
        if mode == "raise":
            raise error
        if mode == "closed":
            return FallbackDecision(allowed=False, reason="rate_limited", action=action,
                                    retry_after=1, degraded=True, error=str(error))
        return FallbackDecision(allowed=True, reason=None, action=action, degraded=True,
                                error=str(error))

    def answer(self, status: int, body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
        """Decode a 200; raise RequestRejected for a 4xx, SidecarUnavailable otherwise."""
        if status == 200:
            try:
                return decoder.decode(body)
            except msgspec.DecodeError as exc:  # includes ValidationError
                raise SidecarUnavailable(f"unreadable answer: {exc}") from exc
        if 400 <= status < 500:
            try:
                message = self._error.decode(body).error
            except msgspec.DecodeError:
                message = body[:200].decode("utf-8", "replace") or f"HTTP {status}"
            raise RequestRejected(status, message)
        raise SidecarUnavailable(f"the sidecar answered HTTP {status}")

    def batch_fallback(self, checks: list[Check], error: SidecarUnavailable) -> list[Decision]:
        """Each check of a batch decided by its own action's fail mode."""
        return [self.fallback(check.action, error) for check in checks]

    @staticmethod
    def token_of(token: str | Decision) -> str | None:
        """The refund token itself, from a token or the Decision that carried one."""
        if isinstance(token, Decision):
            return token.refund
        return token


CLEAR_UNAVAILABLE = ClearResult(cleared=False, reason="unavailable", degraded=True)
NOTHING_TAKEN = RefundResult(refunded=False, reason="nothing_taken")
UNAVAILABLE = RefundResult(refunded=False, reason="unavailable", degraded=True)
