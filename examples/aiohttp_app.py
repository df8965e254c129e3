"""An aiohttp app that uses ratekeeper (docs/integration.md has the patterns).

``python examples/aiohttp_app.py`` serves it on 127.0.0.1:8000 against a sidecar on :8080
running examples/pypi.toml. The user comes from an ``X-User`` header and every password is
"secret": stand-ins for your real authentication.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from ratekeeper.api.wire import Decision
from ratekeeper.client import AsyncClient
from ratekeeper.client.middleware import ratekeeper_middleware
from ratekeeper.config.routes import RouteTable

RULES = Path(__file__).with_name("pypi.toml")
RATEKEEPER = web.AppKey("ratekeeper", AsyncClient)
PROJECTS = web.AppKey("projects", set[str])


def refuse(decision: Decision) -> web.HTTPException:
    """403 with the kill switch's message, or 429 with Retry-After."""
    if decision.reason in ("disabled", "banned"):
        return web.HTTPForbidden(text=decision.message or "blocked")
    return web.HTTPTooManyRequests(text="too many attempts",
                                   headers={"Retry-After": str(decision.retry_after)})


async def login(request: web.Request) -> web.Response:
    """Count only failures: peek with cost 0, hit when the password is wrong."""
    rk, form = request.app[RATEKEEPER], await request.post()
    ip, user = request.remote or "", request.headers.get("X-User", "")
    peek = await rk.check("login", ip=ip, user=user, cost=0)
    if not peek.allowed:
        raise refuse(peek)
    if form.get("password") != "secret":
        await rk.check("login", ip=ip, user=user)
        raise web.HTTPUnauthorized(text="wrong password")
    return web.Response(text=f"welcome {user}")


async def create_project(request: web.Request) -> web.Response:
    """Hit first, refund when the creation fails."""
    rk, form = request.app[RATEKEEPER], await request.post()
    name = str(form.get("name", ""))
    decision = await rk.check("project-create", ip=request.remote or "",
                              user=request.headers.get("X-User", ""))
    if not decision.allowed:
        raise refuse(decision)
    try:
        if name.startswith("broken") or name in request.app[PROJECTS]:
            raise web.HTTPConflict(text=f"cannot create {name}")
        request.app[PROJECTS].add(name)
    except Exception:
        await rk.refund(decision)
        raise
    return web.Response(text=f"created {name}")


async def upload(request: web.Request) -> web.Response:
    """Kill switches and limits are checked before the body is read."""
    decision = await request.app[RATEKEEPER].check(
        "upload", ip=request.remote or "", user=request.headers.get("X-User", ""),
        project=request.match_info["project"])
    if not decision.allowed:
        raise refuse(decision)
    await request.read()
    return web.Response(text="uploaded")


def make_app(ratekeeper_url: str, *, timeout: float = 0.05) -> web.Application:
    """The app; the client lives as long as the app (cleanup_ctx)."""
    client = AsyncClient(ratekeeper_url, timeout=timeout, fail={"upload": "closed"})

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        yield
        await client.close()

    app = web.Application(middlewares=[
        ratekeeper_middleware(client, RouteTable.from_file(RULES))])
    app[RATEKEEPER], app[PROJECTS] = client, set()
    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/login", login)
    app.router.add_post("/projects", create_project)
    app.router.add_post("/upload/{project}", upload)
    return app


if __name__ == "__main__":
    web.run_app(make_app(os.environ.get("RATEKEEPER_URL", "http://127.0.0.1:8080")),
                host="127.0.0.1", port=8000)
