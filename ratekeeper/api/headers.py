"""IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers) and Retry-After.

Structured-field lists of items: ``RateLimit-Policy: "login-ip";q=10;w=300`` and
``RateLimit: "login-ip";r=3;t=120``. A rule with several windows is named ``rule-0``,
``rule-1``... in window order, as Warehouse does. No partition key is sent: it would carry
the subject, and these headers never carry an IP or its hash.

``Retry-After`` is sent only when the sidecar knows when trying again can succeed, and is the
same on every path (``/v1/check``, ``/v1/authz``, the middlewares):

- ``rate_limited``: always, the seconds until enough of the window has passed (at least 1;
  a fail-closed answer while Redis is down says 1);
- ``banned``: when the ban (or penalty box) has a known end, the seconds until it;
- ``disabled``: only when the kill switch turns itself off at a known time, the seconds until
  then (the Decision's ``retry_after``); a switch without an expiry has no end to announce;
- never when allowed or in shadow mode.
"""

from __future__ import annotations

from collections import Counter

from ratekeeper.api.wire import Decision, LimitState

__all__ = ["policy_names", "rate_limit_headers", "rate_limit_lines", "retry_after"]

# (rule, limit, window) of every limit of an answer -> (the names the headers use, the
# RateLimit-Policy value, the RateLimit value with %d for each remaining and reset, and both
# as HTTP/1.1 header lines, a bytes %-format). An action's policy never changes between
# requests, so it is built once; the cap only guards against an unbounded number of configs
# over reloads.
Shape = tuple[tuple[str, int, int], ...]
Known = tuple[tuple[str, ...], str, str, bytes]
_POLICIES: dict[Shape, Known] = {}
_MAX_SHAPES = 4096


def _policy(shape: Shape) -> Known:
    windows_per_rule = Counter(rule for rule, _, _ in shape)
    seen: Counter[str] = Counter()
    names, policies = [], []
    for rule, limit, window in shape:
        name = rule
        if windows_per_rule[rule] > 1:
            name = f"{rule}-{seen[rule]}"
            seen[rule] += 1
        names.append(name)
        policies.append(f'"{name}";q={limit};w={window}')
    # the RateLimit value as a %-format: each name's own '%' doubled
    escaped = [name.replace("%", "%%") for name in names]
    state = ", ".join(f'"{name}";r=%d;t=%d' for name in escaped)
    policy = ", ".join(policies)
    lines = (f"RateLimit-Policy: {policy.replace('%', '%%')}\r\nRateLimit: {state}\r\n"
             .encode())
    return tuple(names), policy, state, lines


def _known(limits: list[LimitState]) -> Known:
    shape = tuple([(item.rule, item.limit, item.window) for item in limits])
    known = _POLICIES.get(shape)
    if known is None:
        known = _policy(shape)
        if len(_POLICIES) < _MAX_SHAPES:
            _POLICIES[shape] = known
    return known


def _figures(limits: list[LimitState]) -> tuple[int, ...]:
    """What the RateLimit value fills in: each limit's remaining hits and reset, in order."""
    values: list[int] = []
    for item in limits:
        values += (item.remaining, item.reset)
    return tuple(values)


def policy_names(decision: Decision) -> tuple[str, ...]:
    """The policy name of each entry of ``decision.limits``: ``rule``, or ``rule-0``..."""
    return _known(decision.limits)[0]


def retry_after(decision: Decision) -> int | None:
    """The Retry-After seconds for ``decision``, or None when it gets none (see above)."""
    if decision.allowed or decision.shadow:
        return None
    if decision.reason == "rate_limited":
        return max(decision.retry_after, 1)
    return decision.retry_after if decision.retry_after > 0 else None


def rate_limit_headers(decision: Decision) -> dict[str, str]:
    """Headers for one decision: the policies, their state, and Retry-After (``retry_after``)."""
    headers: dict[str, str] = {}
    limits = decision.limits
    if limits:
        _, policy, state, _ = _known(limits)
        headers["RateLimit-Policy"] = policy
        headers["RateLimit"] = state % _figures(limits)
    seconds = retry_after(decision)
    if seconds is not None:
        headers["Retry-After"] = str(seconds)
    return headers


def rate_limit_lines(decision: Decision) -> bytes:
    """``rate_limit_headers`` as the HTTP/1.1 header lines of an answer, each CRLF-ended."""
    limits = decision.limits
    lines = _known(limits)[3] % _figures(limits) if limits else b""
    seconds = retry_after(decision)
    if seconds is not None:
        lines += b"Retry-After: %d\r\n" % seconds
    return lines
