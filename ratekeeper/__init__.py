"""Rate limiting and abuse control for package indexes: an aiohttp sidecar over Redis Lua.

The names below are imported when first used, so that importing a part of the package (the
clients above all) loads only that part.
"""

from __future__ import annotations

from ratekeeper._version import __version__ as __version__
from ratekeeper.lazy import exports

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
__getattr__, __dir__ = exports(__name__, _HOMES)
