"""Rate limiting and abuse control for package indexes: an aiohttp sidecar over Redis Lua.

The names below are imported when first used, so that importing a part of the package (the
clients above all) loads only that part.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ratekeeper._version import __version__ as __version__

# each public name, and the module that defines it
_HOMES = {
    "BadRequest": "ratekeeper.errors",
    "Config": "ratekeeper.config.rules",
    "ConfigError": "ratekeeper.errors",
    "Decision": "ratekeeper.api.wire",
    "LimitState": "ratekeeper.api.wire",
    "RatekeeperError": "ratekeeper.errors",
    "Settings": "ratekeeper.settings",
    "SettingsError": "ratekeeper.errors",
    "StoreUnavailable": "ratekeeper.errors",
    "create_app": "ratekeeper.app",
    "load_config": "ratekeeper.config.rules",
}

__all__ = sorted(_HOMES, key=str.casefold)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ratekeeper' has no attribute {name!r}")
    return getattr(import_module(home), name)


def __dir__() -> list[str]:
    return [*globals(), *__all__]
