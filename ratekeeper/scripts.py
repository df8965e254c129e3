"""The Lua scripts in ``lua/``: read once from package data, registered on a client."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = ["Scripts", "read_script"]


def read_script(name: str) -> str:
    """The source of ``lua/<name>.lua`` shipped with the package."""
    return resources.files("ratekeeper").joinpath("lua", f"{name}.lua").read_text("utf-8")


@dataclass(frozen=True, slots=True)
class Scripts:
    """Registered script objects; each reloads itself after NOSCRIPT (a flush or a failover)."""

    check: Any
    refund: Any

    @classmethod
    def register(cls, redis: Any) -> Scripts:
        """Register every script on ``redis`` (a client, cluster client or fakeredis)."""
        return cls(check=redis.register_script(read_script("check")),
                   refund=redis.register_script(read_script("refund")))

    @property
    def all(self) -> list[Any]:
        """Every registered script."""
        return [self.check, self.refund]

    @property
    def shas(self) -> list[str]:
        """The SHA1 of every script, for readiness checks."""
        return [script.sha for script in self.all]
