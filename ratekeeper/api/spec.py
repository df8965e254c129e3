"""Every HTTP endpoint, with the types its handler decodes and encodes: the OpenAPI source."""

from __future__ import annotations

from typing import Any

import msgspec

from ratekeeper._version import __version__
from ratekeeper.api.admin_wire import (
    MAX_AUDIT_LIMIT,
    MAX_TOP_LIMIT,
    AuditList,
    BanList,
    BanView,
    FlagList,
    FlagUpdate,
    FlagView,
    LiftRequest,
    LiftResult,
    ResetResult,
    TopResult,
    TrafficPicture,
    TripwireList,
    TripwireUpdate,
    TripwireView,
    ban_request_type,
    reset_request_type,
)
from ratekeeper.api.openapi import (
    BAN_REQUEST,
    BATCH_REQUEST,
    CHECK_REQUEST,
    RATE_LIMIT_HEADERS,
    RESET_REQUEST,
    Endpoint,
    Param,
    Reply,
    build_spec,
)
from ratekeeper.api.wire import (
    BatchResponse,
    ClearResult,
    Decision,
    ErrorBody,
    FlagStates,
    Health,
    Problem,
    Readiness,
    RefundRequest,
    RefundResult,
)

__all__ = ["ENDPOINTS", "openapi_document"]

BAD = Reply("Bad input: what is wrong, in one sentence", ErrorBody)
TOO_BIG = Reply("The body is over 64 KiB", ErrorBody)
RETRY = {**RATE_LIMIT_HEADERS, "Retry-After": "Seconds until the request would pass"}
PROBLEM = "application/problem+json"

CHECK_ENDPOINTS = [
    Endpoint("POST", "/v1/check", "May this client do this action now?", "check",
             request=CHECK_REQUEST,
             replies={200: Reply("A decision, allowed or not", Decision, headers=RETRY),
                      400: BAD, 413: TOO_BIG}),
    Endpoint("POST", "/v1/check/batch", "Several checks, answered in order", "check",
             request=BATCH_REQUEST,
             replies={200: Reply("One decision per check", BatchResponse), 400: BAD,
                      413: TOO_BIG}),
    Endpoint("POST", "/v1/refund", "Give back the hits a check took, once", "check",
             request=RefundRequest,
             replies={200: Reply("Refunded, or why not", RefundResult), 400: BAD,
                      413: TOO_BIG}),
]

PROXY_ENDPOINTS = [
    Endpoint("GET", "/v1/authz",
             "nginx auth_request / Traefik forwardAuth: may the forwarded request go on?",
             "proxy",
             replies={204: Reply("Allowed (or no route matches)", headers=RATE_LIMIT_HEADERS),
                      400: BAD,
                      403: Reply("Disabled by a kill switch, or banned", Problem, PROBLEM),
                      429: Reply("Rate limited", Problem, PROBLEM, headers=RETRY)}),
    *[Endpoint(method, "/v1/authz/envoy/{path}",
               "Envoy ext_authz (HTTP): may <method> /<path> go on?", "proxy",
               replies={200: Reply("Allowed (or no route matches)",
                                   headers=RATE_LIMIT_HEADERS),
                        403: Reply("Disabled by a kill switch, or banned", Problem, PROBLEM),
                        429: Reply("Rate limited", Problem, PROBLEM, headers=RETRY)})
      for method in ("GET", "POST", "PUT", "DELETE")],
]

OPS_ENDPOINTS = [
    Endpoint("GET", "/healthz", "The process answers", "operations",
             replies={200: Reply("Alive", Health)}),
    Endpoint("GET", "/readyz", "Redis answers and the scripts are loaded", "operations",
             replies={200: Reply("Ready", Readiness), 503: Reply("Not ready", Readiness)}),
    Endpoint("GET", "/metrics", "Prometheus metrics of every worker", "operations",
             replies={200: Reply("Prometheus text format", media="text/plain")}),
    Endpoint("GET", "/openapi.json", "This document", "operations",
             replies={200: Reply("OpenAPI 3.1", media="application/json")}),
]

# The admin API: a bearer token first (401), a viewer token may only read (403), and a change
# that could not reach Redis is a 503 that is safe to repeat.
NO_TOKEN = Reply("No valid admin token: nothing was read or changed", ErrorBody,
                 headers={"WWW-Authenticate": "Bearer realm=\"ratekeeper\""})
READ_ONLY = Reply("A viewer token may only read", ErrorBody)
NO_REDIS = Reply("Redis is unavailable: retry (every change is safe to repeat)", ErrorBody)
ADMIN_ERRORS = {400: BAD, 401: NO_TOKEN, 403: READ_ONLY, 503: NO_REDIS}


def _admin(method: str, path: str, summary: str, replies: dict[int, Reply], *,
           request: Any = None, params: tuple[Param, ...] = (),
           body_required: bool = True) -> Endpoint:
    errors = {**ADMIN_ERRORS, **({413: TOO_BIG} if request is not None else {})}
    return Endpoint(method, f"/v1/admin{path}", summary, "admin", {**errors, **replies},
                    request=request, params=params, auth=True, body_required=body_required)


ADMIN_ENDPOINTS = [
    _admin("GET", "/flags", "Every kill switch (stale: this process's last known state)",
           {200: Reply("The kill switches", FlagList)}),
    _admin("PUT", "/flags/{name}", "Turn a kill switch on or off",
           {200: Reply("Its new state", FlagView), 404: Reply("No such flag", ErrorBody)},
           request=FlagUpdate),
    _admin("GET", "/audit", "The last admin changes, newest first",
           {200: Reply("Audit events", AuditList)},
           params=(Param("limit", "query", {"type": "integer", "minimum": 1,
                                            "maximum": MAX_AUDIT_LIMIT}),)),
    _admin("POST", "/bans", "Ban one subject (an ip is hashed on the way in)",
           {201: Reply("The ban", BanView)}, request=BAN_REQUEST),
    _admin("GET", "/bans", "Active bans, newest first, by subject hash",
           {200: Reply("Active bans", BanList)}),
    _admin("DELETE", "/bans/{id}", "Lift a ban everywhere",
           {200: Reply("Lifted", LiftResult), 404: Reply("No such active ban", ErrorBody)},
           request=LiftRequest, body_required=False),
    _admin("POST", "/reset", "Clear a subject's counters and penalty boxes",
           {200: Reply("What was cleared", ResetResult)}, request=RESET_REQUEST),
    _admin("GET", "/top", "The most-denied subjects of a rule over the last hour (hashed)",
           {200: Reply("The top list", TopResult)},
           params=(Param("rule", "query", {"type": "string"}, required=True),
                   Param("limit", "query", {"type": "integer", "minimum": 1,
                                            "maximum": MAX_TOP_LIMIT}))),
    _admin("GET", "/tripwires", "Every tripwire: its count in the window, armed, tripped",
           {200: Reply("The tripwires", TripwireList)}),
    _admin("PUT", "/tripwires/{name}", "Disarm a tripwire, or re-arm it (clearing a trip)",
           {200: Reply("Its new state", TripwireView),
            404: Reply("No such tripwire", ErrorBody)}, request=TripwireUpdate),
    _admin("GET", "/traffic", "Every process's decisions per minute over the last hour",
           {200: Reply("Decisions per action, minute and category", TrafficPicture)}),
]

# The origin's endpoints: a credential of their own (RATEKEEPER_ORIGIN_TOKEN), not an admin's.
NO_ORIGIN_TOKEN = Reply("No valid origin token", ErrorBody,
                        headers={"WWW-Authenticate": "Bearer realm=\"ratekeeper-origin\""})
ORIGIN_ENDPOINTS = [
    Endpoint("GET", "/v1/origin/flags", "Every kill switch: on or off, its message, banner",
             "origin", replies={200: Reply("The kill switches", FlagStates),
                                401: NO_ORIGIN_TOKEN}, auth=True),
    Endpoint("POST", "/v1/origin/state",
             "A look at an action (a check's body, its cost not read), answered by Redis",
             "origin", request=CHECK_REQUEST,
             replies={200: Reply("What a check of cost 0 answers", Decision), 400: BAD,
                      401: NO_ORIGIN_TOKEN, 413: TOO_BIG}, auth=True),
    Endpoint("POST", "/v1/origin/clear",
             "Clear a clearable action's counters for these subjects (a check's body)",
             "origin", request=CHECK_REQUEST,
             replies={200: Reply("Cleared, or why not", ClearResult), 400: BAD,
                      401: NO_ORIGIN_TOKEN,
                      403: Reply("The action is not clearable", ErrorBody), 413: TOO_BIG},
             auth=True),
]

ENDPOINTS: list[Endpoint] = [*CHECK_ENDPOINTS, *PROXY_ENDPOINTS, *OPS_ENDPOINTS,
                             *ADMIN_ENDPOINTS, *ORIGIN_ENDPOINTS]
_FIXED_CHECK_FIELDS = {"action", "cost"}


def openapi_document(check_type: Any, batch_type: Any) -> dict[str, Any]:
    """The OpenAPI document for the live config's request types."""
    # the admin bodies name the same subject fields as the check request
    subjects = [f.name for f in msgspec.structs.fields(check_type)
                if f.name not in _FIXED_CHECK_FIELDS]
    return build_spec(ENDPOINTS, check_type=check_type, batch_type=batch_type,
                      ban_type=ban_request_type(subjects),
                      reset_type=reset_request_type(subjects), version=__version__)
