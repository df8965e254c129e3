"""A WSGI app that uses ratekeeper as Warehouse would (docs/integration.md has the patterns).

Run the sidecar with examples/pypi.toml, then e.g. ``python -m wsgiref.simple_server``-style:
``python examples/wsgi_app.py`` serves it on 127.0.0.1:8000. The user name comes from an
``X-User`` header and passwords are "secret": stand-ins for your real authentication.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from ratekeeper.api.wire import Decision
from ratekeeper.client import SyncClient
from ratekeeper.client.middleware import RatekeeperMiddleware
from ratekeeper.config.routes import RouteTable

RULES = Path(__file__).with_name("pypi.toml")
PROJECTS: set[str] = set()


class Refused(Exception):
    """A request ratekeeper (or the app) turned down: an HTTP status and a message."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def refuse(decision: Decision) -> Refused:
    """The answer for a denied decision: 403 with the kill switch's message, or 429."""
    if decision.reason == "disabled":
        return Refused("403 Forbidden", decision.message or "disabled")
    if decision.reason == "banned":
        return Refused("403 Forbidden", "blocked")
    return Refused("429 Too Many Requests", f"too many attempts, retry in {decision.retry_after}s")


class Views:
    """The three Warehouse patterns, each a few lines around the client."""

    def __init__(self, ratekeeper: SyncClient) -> None:
        self.rk = ratekeeper

    def login(self, ip: str, user: str, password: str) -> str:
        # count only failures: look first (cost 0), take a hit only when the password is wrong
        peek = self.rk.check("login", ip=ip, user=user, cost=0)
        if not peek.allowed:
            raise refuse(peek)
        if password != "secret":
            self.rk.check("login", ip=ip, user=user)
            raise Refused("401 Unauthorized", "wrong password")
        return f"welcome {user}"

    def create_project(self, ip: str, user: str, name: str) -> str:
        # hit first (it reserves the slot atomically), give it back if creation fails
        decision = self.rk.check("project-create", ip=ip, user=user)
        if not decision.allowed:
            raise refuse(decision)
        try:
            if name.startswith("broken") or name in PROJECTS:
                raise Refused("409 Conflict", f"cannot create {name}")
            PROJECTS.add(name)
        except Exception:
            self.rk.refund(decision)
            raise
        return f"created {name}"

    def upload(self, ip: str, user: str, project: str) -> str:
        # the kill switches (read-only, disallow-new-upload) and limits, before reading the file
        decision = self.rk.check("upload", ip=ip, user=user, project=project)
        if not decision.allowed:
            raise refuse(decision)
        return f"uploaded to {project}"


def make_app(ratekeeper: SyncClient) -> Callable[..., Iterable[bytes]]:
    """The WSGI application, wrapped in the middleware for the config's [[routes]]."""
    views = Views(ratekeeper)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        size = int(environ.get("CONTENT_LENGTH") or 0)
        form = {k: v[0] for k, v in parse_qs(environ["wsgi.input"].read(size).decode()).items()}
        ip, user = environ["REMOTE_ADDR"], environ.get("HTTP_X_USER", "")
        path = environ.get("PATH_INFO", "")
        try:
            if path == "/login":
                text = views.login(ip, user, form.get("password", ""))
            elif path == "/projects":
                text = views.create_project(ip, user, form.get("name", ""))
            elif path == "/upload":
                text = views.upload(ip, user, form.get("project", ""))
            else:
                text = "ok"
            status = "200 OK"
        except Refused as exc:
            status, text = exc.status, str(exc)
        start_response(status, [("Content-Type", "application/json")])
        return [json.dumps({"message": text}).encode()]

    return RatekeeperMiddleware(app, ratekeeper, RouteTable.from_file(RULES))


if __name__ == "__main__":
    from wsgiref.simple_server import make_server

    client = SyncClient(os.environ.get("RATEKEEPER_URL", "http://127.0.0.1:8080"),
                        fail={"upload": "closed"})
    make_server("127.0.0.1", 8000, make_app(client)).serve_forever()
