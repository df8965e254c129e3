"""The Lua scripts in ``lua/``: read once from package data, bound to a client.

check.lua decides many checks per call (see its contract); ``check_args`` builds the ARGV
of a call of one check, and ``check_replies`` takes a call's answer apart per check.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

__all__ = ["LuaScript", "Scripts", "check_args", "check_replies", "read_script"]


# Lua sources a script is sent with, before its own: Redis scripts cannot load one another,
# so a script that shares functions is run as the shared source followed by its own file.
_SENT_BEFORE: dict[str, tuple[str, ...]] = {"check": ("counter",), "refund": ("counter",)}


def read_script(name: str) -> str:
    """The source Redis runs for ``lua/<name>.lua`` (shipped as the package data of
    ``ratekeeper.lua``): its shared sources, then its own file."""
    lua = resources.files("ratekeeper.lua")
    return "".join(lua.joinpath(f"{part}.lua").read_text("utf-8")
                   for part in (*_SENT_BEFORE.get(name, ()), name))


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


def check_args(now: str | int, cost: int, n_keys: int,
               rule_args: Sequence[str | int]) -> list[str | int]:
    """check.lua's ARGV for a call of one request (``now``: '' for Redis TIME).

    One request, one rule set (``rule_args``), then the request: its cost, its number of
    KEYS, and its set.
    """
    return [now, 1, 1, len(rule_args), *rule_args, cost, n_keys, 1]


def check_replies(raw: Sequence[Any]) -> list[Any]:
    """One entry per request of a check.lua call: its flat reply, or a ResponseError.

    A request whose decision raised an error in Lua is answered with the error's message
    (a string among arrays); it becomes that request's own ResponseError here.
    """
    return [_error(reply.decode("utf-8", "replace")) if isinstance(reply, bytes)
            else _error(reply) if isinstance(reply, str) else reply for reply in raw]


# error replies by their first word, as redis-py names them
_ERRORS: dict[str, type[ResponseError]] = {"NOSCRIPT": NoScriptError, "READONLY": ReadOnlyError}


def _error(text: str) -> ResponseError:
    """The error redis-py would raise for this error reply (its class by the reply's prefix)."""
    prefix, _, rest = text.partition(" ")
    kind = _ERRORS.get(prefix)
    return kind(rest) if kind is not None else ResponseError(text)


@dataclass(frozen=True, slots=True)
class Scripts:
    """Every script of the package, bound to one client."""

    check: LuaScript  # many checks per call (``check_args``, ``check_replies``)
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
