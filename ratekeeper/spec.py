"""Every HTTP endpoint, with the types its handler decodes and encodes: the OpenAPI source."""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .openapi import (
    BATCH_REQUEST,
    CHECK_REQUEST,
    RATE_LIMIT_HEADERS,
    Endpoint,
    Reply,
    build_spec,
)
from .wire import (
    BatchResponse,
    Decision,
    ErrorBody,
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

ENDPOINTS: list[Endpoint] = [*CHECK_ENDPOINTS, *PROXY_ENDPOINTS, *OPS_ENDPOINTS]


def openapi_document(check_type: Any, batch_type: Any) -> dict[str, Any]:
    """The OpenAPI document for the live config's request types."""
    return build_spec(ENDPOINTS, check_type=check_type, batch_type=batch_type,
                      version=__version__)
