"""The Lua scripts in ``lua/``: read once from package data, bound to a client."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

__all__ = ["LuaScript", "Scripts", "read_script"]


def read_script(name: str) -> str:
    """The source of ``lua/<name>.lua`` shipped with the package."""
    return resources.files("ratekeeper").joinpath("lua", f"{name}.lua").read_text("utf-8")


class LuaScript:
    """A script run by EVALSHA, falling back to EVAL when Redis does not have it cached.

    redis-py's own Script reloads once on NOSCRIPT, which a second flush racing the reload
    defeats; EVAL carries the source, so it succeeds whatever the script cache holds (and
    caches the script again for the next EVALSHA).
    """

    __slots__ = ("client", "name", "script", "sha")

    def __init__(self, client: Any, name: str, source: str) -> None:
        self.client = client
        self.name = name
        self.script = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (),
                       client: Any = None) -> Any:
        """Run the script with ``keys`` and ``args`` on ``client`` (default: the bound one)."""
        target = self.client if client is None else client
        try:
            return await target.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await target.eval(self.script, len(keys), *keys, *args)


@dataclass(frozen=True, slots=True)
class Scripts:
    """Every script of the package, bound to one client."""

    check: LuaScript
    refund: LuaScript

    @classmethod
    def register(cls, redis: Any) -> Scripts:
        """Bind every script to ``redis`` (a client, cluster client or fakeredis)."""
        return cls(check=LuaScript(redis, "check", read_script("check")),
                   refund=LuaScript(redis, "refund", read_script("refund")))

    @property
    def all(self) -> list[LuaScript]:
        """Every script."""
        return [self.check, self.refund]

    @property
    def shas(self) -> list[str]:
        """The SHA1 of every script, for readiness checks."""
        return [script.sha for script in self.all]
