"""The OpenAPI 3.1 document, generated from the endpoint table the server registers.

``spec.py`` declares every endpoint with the msgspec types its handler decodes and encodes;
``build_spec`` documents that list with the JSON Schemas msgspec derives from those very types,
so a field cannot change in one place only, and a test checks that the routes the app serves
and the paths the spec lists are the same set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

__all__ = ["BAN_REQUEST", "BATCH_REQUEST", "CHECK_REQUEST", "RESET_REQUEST", "Endpoint", "Param",
           "Reply", "build_spec"]

CHECK_REQUEST = "<check request>"  # stands for the type generated from the config
BATCH_REQUEST = "<batch request>"
BAN_REQUEST = "<ban request>"  # the admin API's, whose subject fields come from the config too
RESET_REQUEST = "<reset request>"
RATE_LIMIT_HEADERS = {
    "RateLimit-Policy": "IETF RateLimit-Policy: the rules' quota policies",
    "RateLimit": "IETF RateLimit: remaining quota and seconds until it goes up",
}


@dataclass(frozen=True, slots=True)
class Reply:
    """One documented response: its description, body type and headers."""

    description: str
    body: Any = None  # a msgspec type, or None for no body
    media: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Param:
    """A query or path parameter."""

    name: str
    where: str  # "query" or "path"
    schema: Mapping[str, Any]
    required: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A route and everything the spec says about it."""

    method: str
    path: str
    summary: str
    tag: str
    replies: Mapping[int, Reply]
    request: Any = None  # a msgspec type, one of the *_REQUEST stand-ins, or None
    params: Sequence[Param] = ()
    auth: bool = False
    body_required: bool = True


def build_spec(endpoints: Iterable[Endpoint], *, check_type: Any, batch_type: Any,
               ban_type: Any = None, reset_type: Any = None,
               title: str = "ratekeeper", version: str = "0") -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``endpoints`` (types resolved for the current config)."""
    endpoints = list(endpoints)
    generated = {CHECK_REQUEST: check_type, BATCH_REQUEST: batch_type, BAN_REQUEST: ban_type,
                 RESET_REQUEST: reset_type}

    def _request_type(request: Any) -> Any:
        return generated[request] if isinstance(request, str) else request

    types: list[Any] = []
    for endpoint in endpoints:
        request = _request_type(endpoint.request)
        if request is not None:
            types.append(request)
        types += [reply.body for reply in endpoint.replies.values() if reply.body is not None]
    unique = list(dict.fromkeys(types))
    schemas, components = msgspec.json.schema_components(
        unique, ref_template="#/components/schemas/{name}")
    schema_of = dict(zip(unique, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        operation: dict[str, Any] = {
            "summary": endpoint.summary,
            "operationId": _operation_id(endpoint),
            "tags": [endpoint.tag],
            "responses": {str(status): _reply(reply, schema_of)
                          for status, reply in sorted(endpoint.replies.items())},
        }
        params = [*endpoint.params, *_path_params(endpoint)]
        if params:
            operation["parameters"] = [_param(p) for p in params]
        request = _request_type(endpoint.request)
        if request is not None:
            operation["requestBody"] = {
                "required": endpoint.body_required,
                "content": {"application/json": {"schema": schema_of[request]}},
            }
        if endpoint.auth:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Rate limiting and abuse control for package indexes."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation_id(endpoint: Endpoint) -> str:
    words = re.sub(r"[^a-zA-Z0-9]+", "_", endpoint.path).strip("_")
    return f"{endpoint.method.lower()}_{words}"


def _path_params(endpoint: Endpoint) -> list[Param]:
    declared = {p.name for p in endpoint.params}
    return [Param(name=name, where="path", schema={"type": "string"}, required=True)
            for name in re.findall(r"{(\w+)}", endpoint.path) if name not in declared]


def _param(param: Param) -> dict[str, Any]:
    out: dict[str, Any] = {"name": param.name, "in": param.where, "schema": dict(param.schema),
                           "required": param.required or param.where == "path"}
    if param.description:
        out["description"] = param.description
    return out


def _reply(reply: Reply, schema_of: Mapping[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": reply.description}
    if reply.body is not None:
        out["content"] = {reply.media: {"schema": schema_of[reply.body]}}
    elif reply.media != "application/json":
        out["content"] = {reply.media: {"schema": {"type": "string"}}}
    if reply.headers:
        out["headers"] = {name: {"description": text, "schema": {"type": "string"}}
                          for name, text in reply.headers.items()}
    return out
