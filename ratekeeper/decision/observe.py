"""What every decision leaves behind: a metric, and for a denial a structured log line.

The log line carries the action, the rule that decided, the reason and the *hashed* subject
(the same hash as in Redis and the admin lists); never an IP, a user name or a request body.

Metrics count every decision. The log is sampled: each (action, rule, reason, flag, subjects)
gets at most one line per ``LOG_EVERY_SECONDS``; the denials in between are not written but
counted, and the next line of that kind says how many (``suppressed``). During a flood a
few hundred abusers would otherwise cost a log line (and a write) per request each.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from ratekeeper.api.wire import Decision
from ratekeeper.logs import decision_log

if TYPE_CHECKING:
    from ratekeeper.config.rules import Action
    from ratekeeper.identity.keys import Keyspace
    from ratekeeper.metrics import Metrics

__all__ = ["LOG_EVERY_SECONDS", "DenialLog", "Observer", "deciding_rule", "outcome_of"]

LOG_EVERY_SECONDS = 10.0
MAX_TRACKED = 20_000  # kinds of denial remembered at once; past that, counting starts over


class DenialLog:
    """Decides which denials get a log line: the first of each kind per ``every`` seconds."""

    __slots__ = ("_clock", "_seen", "every", "max_tracked")

    def __init__(self, clock: Callable[[], float], every: float = LOG_EVERY_SECONDS,
                 max_tracked: int = MAX_TRACKED) -> None:
        self._clock = clock
        self.every = every
        self.max_tracked = max_tracked
        self._seen: dict[Hashable, list[float]] = {}  # kind -> [last logged at, suppressed]

    def admit(self, kind: Hashable) -> int | None:
        """None: don't log this one (it is counted); else log it, with this many suppressed
        since the previous line of its kind."""
        now = self._clock()
        seen = self._seen.get(kind)
        if seen is not None and now - seen[0] < self.every:
            seen[1] += 1
            return None
        if seen is None and len(self._seen) >= self.max_tracked:
            self._seen.clear()
        self._seen[kind] = [now, 0]
        return 0 if seen is None else int(seen[1])


def outcome_of(decision: Decision) -> str:
    """The metric outcome: allowed, rate_limited, disabled, banned, shadow or degraded."""
    if decision.degraded:
        return "degraded"
    if decision.shadow:
        return "shadow"
    return decision.reason or "allowed"


def deciding_rule(action: Action, decision: Decision, cost: int) -> str:
    """The first rule with a window that (would have) denied this cost, or whose penalty box
    denied; '' if none did."""
    if decision.reason == "banned":  # a penalty box names its rule; an admin's ban, none
        return decision.limits[0].rule if decision.limits else ""
    if decision.reason != "rate_limited":
        return ""
    want = max(cost, 1)
    for item in decision.limits:
        if item.remaining < want:
            return item.rule
    return ""


class Observer:
    """Counts every decision of a checker and logs its denials (sampled by ``denials``)."""

    __slots__ = ("denials", "keyspace", "metrics")

    def __init__(self, keyspace: Keyspace, metrics: Metrics | None, denials: DenialLog
                 ) -> None:
        self.keyspace = keyspace
        self.metrics = metrics
        self.denials = denials

    def observe(self, action: Action, values: dict[str, bytes], cost: int, decision: Decision,
                culprit: tuple[str, str] | None = None) -> None:
        """Count ``decision``; log it when it denied (or would have, in shadow mode).

        ``culprit`` is the (fields, hash) of the subject whose ban or penalty box denied,
        when known: the line names that subject alone. A kill switch's denials are one kind
        per action and flag, whoever sends them: the subjects play no part in them.
        """
        outcome = outcome_of(decision)
        rule = deciding_rule(action, decision, cost)
        if self.metrics is not None:
            self.metrics.decision(action.name, rule, outcome)
        if decision.allowed and not decision.shadow:
            return
        keyspace = self.keyspace
        subjects: dict[str, Any]
        if culprit is not None:
            subjects = {culprit[0]: culprit[1]}
        elif rule:
            fields = next(r.key for r in action.rules if r.name == rule)
            subjects = {"+".join(fields) or "global":
                        keyspace.subject((f, values[f]) for f in fields)}
        else:
            subjects = {field: keyspace.subject(((field, value),))
                        for field, value in values.items()}
        kind: tuple[Any, ...] = (action.name, rule, decision.reason, decision.flag)
        if decision.reason != "disabled":
            kind += tuple(subjects.values())
        suppressed = self.denials.admit(kind)
        if suppressed is None:
            return
        decision_log.info(
            "denied" if not decision.allowed else "would deny (shadow)",
            extra={"action": action.name, "rule": rule, "reason": decision.reason,
                   "outcome": outcome, "flag": decision.flag, "subjects": subjects,
                   "retry_after": decision.retry_after, "suppressed": suppressed},
        )
