"""The exceptions ratekeeper raises.

    RatekeeperError
    ├── ConfigError        the rules file is invalid (every message names file and key)
    ├── SettingsError      an environment variable is missing or invalid
    ├── BadRequest         a client sent something we cannot decide on (becomes a 400)
    └── StoreUnavailable   Redis could not be asked in time (the fail mode decides)
"""

from __future__ import annotations

__all__ = ["BadRequest", "ConfigError", "RatekeeperError", "SettingsError", "StoreUnavailable"]


class RatekeeperError(Exception):
    """Base class of every error ratekeeper raises on purpose."""


class ConfigError(RatekeeperError):
    """The rules file is invalid; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class SettingsError(RatekeeperError):
    """An environment variable is missing or invalid."""


class BadRequest(RatekeeperError):
    """Client input that cannot be decided on; the message is one sentence for the caller."""


class StoreUnavailable(RatekeeperError):
    """Redis did not answer in time or answered with an error."""
