"""Rate limiting and abuse control for package indexes: an aiohttp sidecar over Redis Lua."""

from __future__ import annotations

from ._version import __version__ as __version__
from .config import Config, load_config
from .errors import BadRequest, ConfigError, RatekeeperError, SettingsError, StoreUnavailable
from .server import create_app
from .settings import Settings
from .wire import Decision, LimitState

__all__ = [
    "BadRequest",
    "Config",
    "ConfigError",
    "Decision",
    "LimitState",
    "RatekeeperError",
    "Settings",
    "SettingsError",
    "StoreUnavailable",
    "create_app",
    "load_config",
]
