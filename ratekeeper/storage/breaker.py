"""The circuit breaker: stop waiting on a Redis that keeps failing, and probe for its return.

    closed     every call goes to Redis; ``threshold`` failures in a row open the circuit
    open       calls fail at once (the fail modes decide) until ``cooldown`` has passed
    half-open  exactly one call (the probe) goes to Redis: success closes the circuit,
               failure opens it for another ``cooldown``; every other call still fails at once

A slow Redis costs one deadline per call until the circuit opens, then nothing; recovery is
noticed by the first call after the cooldown, so decisions are normal again within about
``cooldown`` plus one round trip of Redis coming back.

A failure is one Redis call's: the coalescer reports a write once, however many checks it
carried, so a hundred checks in one slow write are one failure, not a hundred.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["Breaker", "BreakerState"]

log = logging.getLogger("ratekeeper.storage.breaker")

BreakerState = Literal["closed", "open", "half-open"]

DEFAULT_THRESHOLD = 5
DEFAULT_COOLDOWN = 0.5  # seconds


class Breaker:
    """Counts consecutive Redis failures and decides whether the next call may try."""

    __slots__ = ("_clock", "_failures", "_opened_at", "_probing", "_state", "cooldown",
                 "threshold")

    def __init__(self, *, threshold: int = DEFAULT_THRESHOLD,
                 cooldown: float = DEFAULT_COOLDOWN,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if threshold < 1 or cooldown <= 0:
            raise ValueError("threshold must be >= 1 and cooldown > 0")
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """closed, open or half-open (open past its cooldown reads as half-open)."""
        if self._state == "open" and self._clock() - self._opened_at >= self.cooldown:
            return "half-open"
        return self._state

    def allow(self) -> bool:
        """May this call go to Redis? In half-open, True for the one probe only."""
        if self._state == "closed":  # every call while Redis answers: no clock read
            return True
        state = self.state
        if state == "half-open" and not self._probing:
            self._state, self._probing = "half-open", True
            return True
        return False

    def success(self) -> None:
        """Redis answered."""
        if self._state != "closed":
            log.info("redis answers again: circuit closed")
        self._state, self._failures, self._probing = "closed", 0, False

    def failure(self) -> None:
        """Redis failed: an error, or no reply within the deadline."""
        self._failures += 1
        if self._state == "half-open" or (
            self._state == "closed" and self._failures >= self.threshold
        ):
            if self._state == "closed":
                log.warning("redis failed %d times in a row: circuit open, answering from "
                            "the fail modes for %.1f s before probing", self._failures,
                            self.cooldown)
            self._state, self._opened_at, self._probing = "open", self._clock(), False

    def abandon(self) -> None:
        """A call that was let through ended without a verdict (it was cancelled)."""
        if self._probing:
            # let the next caller probe instead of leaving the circuit half-open forever
            self._state, self._probing = "open", False
            self._opened_at = self._clock() - self.cooldown
