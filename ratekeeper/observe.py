"""What every decision leaves behind: a metric, and for a denial one structured log line.

The log line carries the action, the rule that decided, the reason and the *hashed* subject
(the same hash as in Redis and the admin lists); never an IP, a user name or a request body.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .logs import decision_log
from .wire import Decision

if TYPE_CHECKING:
    from .config import Action
    from .service import Checker

__all__ = ["deciding_rule", "observe", "outcome_of"]


def outcome_of(decision: Decision) -> str:
    """The metric outcome: allowed, rate_limited, disabled, banned, shadow or degraded."""
    if decision.degraded:
        return "degraded"
    if decision.shadow:
        return "shadow"
    return decision.reason or "allowed"


def deciding_rule(action: Action, decision: Decision, cost: int) -> str:
    """The first rule with a window that (would have) denied this cost; '' if none did."""
    if decision.reason != "rate_limited":
        return ""
    want = max(cost, 1)
    for item in decision.limits:
        if item.remaining < want:
            return item.rule
    return ""


def observe(checker: Checker, action: Action, values: dict[str, bytes], cost: int,
            decision: Decision) -> None:
    """Count ``decision``; log it when it denied (or would have, in shadow mode)."""
    outcome = outcome_of(decision)
    rule = deciding_rule(action, decision, cost)
    if checker.metrics is not None:
        checker.metrics.decision(action.name, rule, outcome)
    if decision.allowed and not decision.shadow:
        return
    keyspace = checker.keyspace
    subjects: dict[str, Any]
    if rule:
        fields = next(r.key for r in action.rules if r.name == rule)
        subjects = {"+".join(fields) or "global":
                    keyspace.subject((f, values[f]) for f in fields)}
    else:
        subjects = {field: keyspace.subject(((field, value),))
                    for field, value in values.items()}
    decision_log.info(
        "denied" if not decision.allowed else "would deny (shadow)",
        extra={"action": action.name, "rule": rule, "reason": decision.reason,
               "outcome": outcome, "flag": decision.flag, "subjects": subjects,
               "retry_after": decision.retry_after},
    )
