"""Warehouse's rate limiter interface (``IRateLimiter``) over ratekeeper's ``SyncClient``.

Warehouse registers each limiter under a name (``user.login``, ``ip.login``, ``global.login``,
``search``, ...) that its ``RateLimit`` factory makes the first identifier; a call adds its own
(an IP, a user id, nothing, at times None). Here the first identifier names the sidecar's
action of that name (``examples/warehouse.toml`` declares every one), and the others, each
``str()``-ed as Warehouse does, become one opaque subject: their JSON list, sent as the
``subject`` field, which the sidecar hashes with its secret like any subject. None and text
that is no IP are keyed as Warehouse keys them, an IP as it is written (no /64 grouping), and
no identifier is stored raw.

The methods answer as Warehouse's limiter over ``limits``' moving window does:

- ``test``: would one more hit pass every window (a check of cost 0)?
- ``hit``: take one hit; False when a window refuses. One difference, on purpose: a refused
  hit takes nothing in any window (``TAKES_NOTHING_WHEN_DENIED``), where Warehouse's
  ``all(window.hit(...) ...)`` keeps the hits it took in the windows before the refusing one.
- ``clear``: delete the counters (``POST /v1/origin/clear``; the action must say
  ``clearable = true``).
- ``resets_in``: a ``timedelta``, to the millisecond, until the soonest exhausted window has
  room again; None when no window is exhausted.
- ``get_window_stats``: one ``WindowStats`` per window, shortest first; a window without hits
  resets in its whole length, as ``limits`` says it.

Every method fails open as Warehouse's does: when the sidecar or its Redis cannot be asked,
``test`` and ``hit`` allow, ``clear`` does nothing, ``resets_in`` is None and
``get_window_stats`` is empty; each such call logs "Error computing rate limits" and counts
``warehouse.ratelimiter.error`` tagged ``call:<method>`` in the metrics given. A request the
sidecar refuses (an action it does not know: the configs disagree) fails open the same way,
logged as an error.

``resets_in``, ``get_window_stats`` and ``clear`` are origin calls: the client needs the
sidecar's origin token (``SyncClient(..., origin_token=...)``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from ratekeeper.api.wire import Decision
from ratekeeper.client.base import ClientError, RequestRejected, SidecarUnavailable
from ratekeeper.client.sync import SyncClient

__all__ = ["ERROR_METRIC", "SUBJECT_FIELD", "TAKES_NOTHING_WHEN_DENIED", "RateLimit",
           "RateLimiter", "WindowStats", "subject_of"]

log = logging.getLogger("ratekeeper.integrations.warehouse")

SUBJECT_FIELD = "subject"  # the subject field warehouse.toml's rules key on
ERROR_METRIC = "warehouse.ratelimiter.error"
# A hit refused by one window takes nothing in the others (Warehouse's takes one in each
# window before the refusing one): the replay in loadtest/warehouse_replay.py measures it.
TAKES_NOTHING_WHEN_DENIED = True

T = TypeVar("T")


class Metrics(Protocol):
    """What Warehouse's metrics service offers that this module uses."""

    def increment(self, name: str, *, tags: Sequence[str] = ...) -> Any: ...


@dataclass(frozen=True)
class WindowStats:
    """One window of a limiter for some identifiers, as Warehouse's ``WindowStats`` reports
    it, with ``resets_in`` to the millisecond beside the whole seconds."""

    amount: int
    window_seconds: int
    remaining: int
    resets_in_seconds: int  # whole seconds, rounded down, as Warehouse's
    resets_in: timedelta = field(default=timedelta(0))


def subject_of(identifiers: Sequence[object]) -> str:
    """The opaque subject for a call's identifiers: the JSON list of their ``str()``."""
    return json.dumps([str(item) for item in identifiers], ensure_ascii=False,
                      separators=(",", ":"))


class RateLimiter:
    """Warehouse's ``IRateLimiter`` over a ``SyncClient``: ``identifiers`` (the limiter's name
    first) come before each call's own; ``limit`` is kept for show, as the sidecar's config
    holds the windows."""

    TAKES_NOTHING_WHEN_DENIED = TAKES_NOTHING_WHEN_DENIED

    def __init__(self, client: SyncClient, limit: str = "", *,
                 identifiers: Sequence[object] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.client = client
        self.limit = limit
        self.identifiers = list(identifiers or [])
        self.metrics = metrics

    def _target(self, identifiers: Sequence[object]) -> tuple[str, str]:
        """(action, subject) of a call; RequestRejected when nothing names the action."""
        every = [*self.identifiers, *identifiers]
        if not every:
            raise RequestRejected(400, "no identifier names the limiter's action")
        return str(every[0]), subject_of(every[1:])

    def _failed(self, call: str, error: BaseException | str) -> None:
        if isinstance(error, RequestRejected):
            log.error("Error computing rate limits: the sidecar refused %s (%s)", call, error)
        else:
            log.warning("Error computing rate limits: %s", error)
        if self.metrics is not None:
            self.metrics.increment(ERROR_METRIC, tags=[f"call:{call}"])

    def _guarded(self, call: str, fallback: T, work: Callable[[], T]) -> T:
        try:
            return work()
        except ClientError as exc:
            self._failed(call, exc)
            return fallback

    def _decided(self, call: str, decision: Decision) -> bool:
        if decision.degraded:  # the sidecar or its Redis could not be asked: a fail mode said
            self._failed(call, "Redis could not be asked")
        return decision.allowed

    def test(self, *identifiers: object) -> bool:
        """True while every window has room for one more hit; consumes nothing."""
        return self._check("test", 0, identifiers)

    def hit(self, *identifiers: object) -> bool:
        """Take one hit in every window; False (and nothing taken) when one refuses."""
        return self._check("hit", 1, identifiers)

    def _check(self, call: str, cost: int, identifiers: Sequence[object]) -> bool:
        def work() -> bool:
            action, subject = self._target(identifiers)
            decision = self.client.check(action, cost=cost, **{SUBJECT_FIELD: subject})
            return self._decided(call, decision)

        return self._guarded(call, True, work)

    def clear(self, *identifiers: object) -> None:
        """Forget every hit of these identifiers (the action must be clearable)."""

        def work() -> None:
            action, subject = self._target(identifiers)
            result = self.client.clear(action, **{SUBJECT_FIELD: subject})
            if not result.cleared:
                self._failed("clear", f"not cleared ({result.reason})")

        self._guarded("clear", None, work)

    def _state(self, identifiers: Sequence[object]) -> Decision:
        """Redis's look at the windows; SidecarUnavailable when Redis could not be asked."""
        action, subject = self._target(identifiers)
        decision = self.client.state(action, **{SUBJECT_FIELD: subject})
        if decision.degraded:
            raise SidecarUnavailable("Redis could not be asked")
        return decision

    def resets_in(self, *identifiers: object) -> timedelta | None:
        """How long until the soonest exhausted window has room; None when none is."""

        def work() -> timedelta | None:
            decision = self._state(identifiers)
            waits = [item.reset_ms for item in decision.limits
                     if item.remaining <= 0 and item.reset_ms > 0]
            return timedelta(milliseconds=min(waits)) if waits else None

        return self._guarded("resets_in", None, work)

    def get_window_stats(self, *identifiers: object) -> list[WindowStats]:
        """One WindowStats per window of the action, shortest first."""

        def work() -> list[WindowStats]:
            decision = self._state(identifiers)
            stats = []
            for item in decision.limits:
                # an empty window has nothing to wait for (reset 0): limits says its length
                ms = item.reset_ms if item.reset_ms > 0 else item.window * 1000
                stats.append(WindowStats(amount=item.limit, window_seconds=item.window,
                                         remaining=item.remaining,
                                         resets_in_seconds=ms // 1000,
                                         resets_in=timedelta(milliseconds=ms)))
            return stats

        return self._guarded("get_window_stats", [], work)


class RateLimit:
    """A service factory that stands where Warehouse's ``RateLimit`` stands: called with
    (context, request), it makes a limiter over the ``SyncClient`` found in
    ``request.registry[registry_key]``, with the metrics service ``metrics_service`` names
    (``request.find_service(metrics_service, context=None)``) when one is given."""

    registry_key = "ratelimiter.storage"

    def __init__(self, limit: str, identifiers: Sequence[object] | None = None,
                 limiter_class: type[RateLimiter] = RateLimiter, *,
                 metrics_service: object | None = None) -> None:
        self.limit = limit
        self.identifiers = identifiers
        self.limiter_class = limiter_class
        self.metrics_service = metrics_service

    def __call__(self, context: object, request: Any) -> RateLimiter:
        metrics = None
        if self.metrics_service is not None:
            metrics = request.find_service(self.metrics_service, context=None)
        return self.limiter_class(request.registry[self.registry_key], limit=self.limit,
                                  identifiers=self.identifiers, metrics=metrics)

    def __repr__(self) -> str:
        return (f'RateLimit("{self.limit}", identifiers={self.identifiers}, '
                f"limiter_class={self.limiter_class})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RateLimit):
            return NotImplemented
        return (self.limit, self.identifiers, self.limiter_class) == (
            other.limit, other.identifiers, other.limiter_class)

    __hash__ = None  # type: ignore[assignment]  # equal by value, and mutable
