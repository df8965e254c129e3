"""GET /openapi.json: a valid OpenAPI 3.1 document of exactly the routes the app serves."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from ratekeeper.config.rules import load_config

from support.common import EXAMPLE

CONFIG = EXAMPLE.read_text()


# The admin web page (HTML forms for people, see README) is not part of the HTTP API.
NOT_API = ("/admin",)


def served_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every API route of ``app`` and its sub-apps, in OpenAPI's notation."""
    routes: set[tuple[str, str]] = set()
    for resource in app.router.resources():
        info = resource.get_info()
        if "app" in info:  # a sub-application: its resources already carry its prefix
            if info["prefix"] not in NOT_API:
                routes |= served_routes(info["app"])
            continue
        path = info.get("path") or info.get("formatter", "")
        path = re.sub(r"{(\w+)(:[^}]*)?}", r"{\1}", path)
        path = path.replace("/v1/authz/envoy{path}", "/v1/authz/envoy/{path}")
        for route in resource:
            if route.method == "HEAD":
                continue
            methods = ["GET", "POST", "PUT", "DELETE"] if route.method == "*" else [route.method]
            routes |= {(m, path) for m in methods}
    return routes


async def test_spec_lists_exactly_the_served_routes(make_client: Any) -> None:
    """Every served route is in the spec and every spec path is served."""
    client = await make_client(CONFIG)
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    spec = await resp.json()
    assert spec["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, item in spec["paths"].items()
                  for method in item}
    assert documented == served_routes(client.server.app)


async def test_check_request_schema_comes_from_the_config(make_client: Any) -> None:
    """The check body's schema names the config's subject fields and forbids others."""
    client = await make_client(CONFIG)
    spec = await (await client.get("/openapi.json")).json()
    body = spec["components"]["schemas"]["CheckRequest"]
    assert set(body["properties"]) == {"action", "ip", "ip_hash", "cost", "user", "project"}
    assert body["additionalProperties"] is False
    assert body["required"] == ["action"]
    assert body["properties"]["cost"] == {"type": "integer", "minimum": 0, "maximum": 1_000_000,
                                          "default": 1}
    decision = spec["components"]["schemas"]["Decision"]
    assert {"allowed", "reason", "action", "retry_after", "flag", "message", "degraded",
            "shadow", "limits"} <= set(decision["properties"])


def test_spec_is_valid_openapi() -> None:
    """The document passes schemathesis' OpenAPI loader (which validates it)."""
    import schemathesis

    from ratekeeper.api.spec import openapi_document
    from ratekeeper.api.wire import batch_request_type, check_request_type

    config = load_config(EXAMPLE)
    check_type = check_request_type(config.subjects)
    spec = openapi_document(check_type, batch_request_type(check_type))
    schema = schemathesis.openapi.from_dict(spec)
    operations = list(schema.get_all_operations())
    assert len(operations) == sum(len(item) for item in spec["paths"].values())


async def test_admin_durations_are_seconds_or_text(make_client: Any) -> None:
    """A flag's expires_in and a ban's duration are documented as whole seconds (within the
    API's bounds) or a duration string such as "2h"."""
    client = await make_client(CONFIG)
    schemas = (await (await client.get("/openapi.json")).json())["components"]["schemas"]
    for schema, most in ((schemas["FlagUpdate"]["properties"]["expires_in"], 366 * 86400),
                         (schemas["BanRequest"]["properties"]["duration"], 3660 * 86400)):
        kinds = {branch["type"]: branch for branch in schema["anyOf"]}
        assert (kinds["integer"]["minimum"], kinds["integer"]["maximum"]) == (1, most)
        assert kinds["string"]["minLength"] == 1 and "2h" in kinds["string"]["examples"]
