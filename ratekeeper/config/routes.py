"""The route table: which action a proxied request is, from its method and path.

``/v1/authz`` and both middlewares match with this one table, so a route means the same thing
at the proxy and in the app. Paths are globs (``*`` matches any characters, ``/`` included; ``?``
one character; ``[...]`` a class), matched against the normalised path; the first route that
matches wins, in config order. A ``GET`` route also matches ``HEAD``, which does the same work.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ratekeeper.config.rules import Config, Route, load_config

__all__ = ["RouteTable", "normalize_path"]

_SLASHES = re.compile(r"/{2,}")
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # RFC 3986 scheme, then an authority


def normalize_path(target: str) -> str:
    """The path a request target names as an origin would route it.

    The query and fragment are dropped, percent-escapes decoded once, repeated slashes and
    ``.``/``..`` segments resolved, so ``//legacy/./x``, ``/%6cegacy/x`` and
    ``/a/../legacy/x`` all match a ``/legacy/*`` route. An absolute-form target
    (``HTTPS://host/legacy/x``, any scheme, any case) names its path. One whose authority
    cannot be read (``http://[::1/legacy/x``) is a ValueError, which says nothing of the
    target: guessing its path could let it past the route it is aimed at.
    """
    if _ABSOLUTE.match(target):
        try:
            target = urlsplit(target).path
        except ValueError:
            raise ValueError("not a valid request target") from None
    path = unquote(target.split("?", 1)[0].split("#", 1)[0])
    path = _SLASHES.sub("/", "/" + path.replace("\\", "/"))
    normal = posixpath.normpath(path)
    if path.endswith("/") and normal != "/":
        normal += "/"
    return normal


class RouteTable:
    """Routes compiled once per config; ``match`` is a few regex tests."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = tuple((route.method, re.compile(fnmatch.translate(route.path)), route)
                             for route in routes)

    @classmethod
    def from_config(cls, config: Config) -> RouteTable:
        """The ``[[routes]]`` of a validated config."""
        return cls(config.routes)

    @classmethod
    def from_file(cls, path: str | Path) -> RouteTable:
        """The ``[[routes]]`` of a rules file (the sidecar's own), for the middlewares."""
        return cls.from_config(load_config(path))

    def __len__(self) -> int:
        return len(self._routes)

    def match(self, method: str, target: str) -> Route | None:
        """The first route for this method and request target, or None; ValueError when the
        target cannot be read (``normalize_path``)."""
        method = method.upper()
        path = normalize_path(target)
        for route_method, pattern, route in self._routes:
            method_fits = route_method in ("*", method) or (route_method, method) == ("GET", "HEAD")
            if method_fits and pattern.match(path):
                return route
        return None
