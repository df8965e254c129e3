"""What a denied request gets back: RFC 9457 problem details and the RateLimit headers.

Shared by ``/v1/authz`` and both middlewares, so a client sees one shape whoever stopped it.
A rate limit is ``429`` with the IETF ``quota-exceeded`` problem type; a kill switch or a ban is
``403`` with the switch's message. ``Retry-After`` follows the one rule of ``headers`` (a rate
limit, a ban with a known end, a kill switch with an expiry), as on ``/v1/check``. Allowed
requests pass with the RateLimit headers only.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from ratekeeper.api.headers import policy_names, rate_limit_headers
from ratekeeper.api.wire import Decision, Problem

__all__ = ["CONTENT_TYPE", "QUOTA_EXCEEDED", "Denial", "denial", "passing_headers"]

CONTENT_TYPE = "application/problem+json"
# draft-ietf-httpapi-ratelimit-headers, "Problem Types"
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
QUOTA_TITLE = "Request cannot be satisfied as assigned quota has been exceeded"
BANNED_DETAIL = "This client is blocked for now."
DISABLED_DETAIL = "This action is disabled for now."

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Denial:
    """The status, headers (Content-Type included), body and detail sentence of a refusal."""

    status: int
    headers: dict[str, str]
    body: bytes
    detail: str


def passing_headers(decision: Decision) -> dict[str, str]:
    """The RateLimit headers to add to a response the request was allowed to get."""
    return rate_limit_headers(decision)  # (no Retry-After: it was allowed)


def denial(decision: Decision) -> Denial | None:
    """The refusal for a denied decision; None when it lets the request through."""
    if decision.allowed:
        return None
    headers = rate_limit_headers(decision)
    body: Problem
    if decision.reason == "disabled":
        detail = decision.message or DISABLED_DETAIL
        body = Problem(type="about:blank", title="Forbidden", status=403, detail=detail,
                       flag=decision.flag)
    elif decision.reason == "banned":
        detail = BANNED_DETAIL
        body = Problem(type="about:blank", title="Forbidden", status=403, detail=detail)
    else:
        retry = max(decision.retry_after, 1)
        detail = f"Too many requests: retry in {retry} second{'s' if retry != 1 else ''}."
        violated = [name for name, item in zip(policy_names(decision), decision.limits,
                                               strict=True) if item.remaining == 0]
        body = Problem(type=QUOTA_EXCEEDED, title=QUOTA_TITLE, status=429, detail=detail,
                       violated_policies=violated)
    status = body.status
    headers["Content-Type"] = CONTENT_TYPE
    return Denial(status=status, headers=headers, body=_encode(body), detail=detail)
