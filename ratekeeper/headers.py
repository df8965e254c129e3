"""IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers) and Retry-After.

Structured-field lists of items: ``RateLimit-Policy: "login-ip";q=10;w=300`` and
``RateLimit: "login-ip";r=3;t=120``. A rule with several windows is named ``rule-0``,
``rule-1``... in window order, as Warehouse does. No partition key is sent: it would carry
the subject, and these headers never carry an IP or its hash.
"""

from __future__ import annotations

from collections import Counter

from .wire import Decision

__all__ = ["policy_names", "rate_limit_headers"]


def policy_names(decision: Decision) -> list[str]:
    """The policy name of each entry of ``decision.limits``: ``rule``, or ``rule-0``..."""
    windows_per_rule = Counter(item.rule for item in decision.limits)
    seen: Counter[str] = Counter()
    names = []
    for item in decision.limits:
        if windows_per_rule[item.rule] > 1:
            names.append(f"{item.rule}-{seen[item.rule]}")
            seen[item.rule] += 1
        else:
            names.append(item.rule)
    return names


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """Headers for one decision: the policies, their state, and Retry-After when denied."""
    headers: dict[str, str] = {}
    if decision.limits:
        policies, states = [], []
        for name, item in zip(policy_names(decision), decision.limits, strict=True):
            policies.append(f'"{name}";q={item.limit};w={item.window}')
            states.append(f'"{name}";r={item.remaining};t={item.reset}')
        headers["RateLimit-Policy"] = ", ".join(policies)
        headers["RateLimit"] = ", ".join(states)
    if not decision.allowed and not decision.shadow:
        headers["Retry-After"] = str(max(decision.retry_after, 1))
    return headers
