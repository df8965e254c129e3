"""Process settings, read once from the environment into one typed object."""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ratekeeper.errors import SettingsError

__all__ = ["AdminToken", "Settings"]

MIN_SALT_LENGTH = 16
DEFAULT_TRUSTED_PROXIES = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True, slots=True)
class AdminToken:
    """One entry of RATEKEEPER_ADMIN_TOKENS: the name the audit trail records, and the secret."""

    name: str
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the process reads from its environment."""

    # RATEKEEPER_REDIS_URL: redis://, rediss://, redis+cluster://, redis+sentinel://, memory://
    redis_url: str = "memory://"
    # RATEKEEPER_IP_SALT: secret key of the keyed IP hash; never logged or stored.
    ip_salt: bytes = field(default=b"", repr=False)
    # RATEKEEPER_IP_SALT_PREVIOUS: the salt before the last rotation, honoured while set (set
    # it for the longest window or ban, then unset it); never logged or stored.
    ip_salt_previous: bytes = field(default=b"", repr=False)
    # True when no salt was given and an ephemeral one was made (memory:// only).
    ephemeral_salt: bool = False
    # RATEKEEPER_ADMIN_TOKENS: name:token pairs for the admin API.
    admin_tokens: tuple[AdminToken, ...] = ()
    # RATEKEEPER_CONFIG: the rules file when --config is not given.
    config_path: str | None = None
    # RATEKEEPER_TRUSTED_PROXIES: peers whose X-Forwarded-For / X-Real-IP we believe.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default_factory=lambda: DEFAULT_TRUSTED_PROXIES
    )
    # RATEKEEPER_KEY_PREFIX: first segment of every Redis key (tests use one per test).
    key_prefix: str = "rk"
    # RATEKEEPER_REDIS_TIMEOUT_MS: deadline of one Redis call (plus 0.2 ms per check it carries).
    # Long enough that a Redis short of CPU for a moment is not taken for a failed one (a
    # deadline miss admits by fail-open), short enough that an outage is noticed at once.
    redis_timeout_ms: int = 200
    # RATEKEEPER_VIEWER_TOKENS: name:token pairs that may read the admin API but change nothing.
    viewer_tokens: tuple[AdminToken, ...] = ()
    # RATEKEEPER_SYNC_INTERVAL_MS: how often each process re-reads flags from Redis, in case
    # a pub/sub message was lost.
    sync_interval_ms: int = 1000
    # RATEKEEPER_LOCAL_CACHE_SIZE: banned / over-limit subjects each process remembers; 0 = off.
    local_cache_size: int = 50_000
    # RATEKEEPER_LOG_FORMAT: "text" for people, "json" for one JSON object per line.
    log_format: Literal["text", "json"] = "text"
    # RATEKEEPER_LOG_LEVEL: INFO logs one line per denial; WARNING keeps only problems.
    log_level: str = "INFO"
    # RATEKEEPER_REQUEST_TIMEOUT_MS: a request's head and body must arrive within this of its
    # first byte (of the connection's opening, for its first request), else it is closed.
    request_timeout_ms: int = 10_000
    # RATEKEEPER_MAX_CONNECTIONS: connections one worker holds at most; 0 = what its file
    # descriptor limit (RLIMIT_NOFILE) leaves after a reserve (``guard.connection_cap``).
    max_connections: int = 0
    # RATEKEEPER_WARMUP_MS: how long a starting worker waits for Redis (connections open,
    # scripts loaded) before it takes connections anyway.
    warmup_ms: int = 10_000
    # RATEKEEPER_WEBHOOK_SECRET: the key of the HMAC-SHA256 every alert is signed with
    # (``Ratekeeper-Signature``); never logged or sent. Empty: alerts go unsigned.
    webhook_secret: bytes = field(default=b"", repr=False)
    # RATEKEEPER_ORIGIN_TOKEN: the credentials of the origin endpoints (``server.origin``),
    # comma-separated so one can be rotated; never logged. None: those endpoints answer 401.
    origin_tokens: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def is_memory(self) -> bool:
        """True for the embedded in-process store."""
        return self.redis_url.startswith("memory://")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``); errors name the variable."""
        env = os.environ if environ is None else environ
        redis_url = env.get("RATEKEEPER_REDIS_URL", "").strip() or "memory://"
        known = ("memory://", "redis://", "rediss://", "redis+cluster://", "redis+sentinel://",
                 "unix://")
        if not redis_url.startswith(known):
            raise SettingsError(
                "RATEKEEPER_REDIS_URL must start with one of " + ", ".join(known)
            )
        salt_text = env.get("RATEKEEPER_IP_SALT", "")
        ephemeral = False
        if salt_text:
            if len(salt_text.encode()) < MIN_SALT_LENGTH:
                raise SettingsError(
                    f"RATEKEEPER_IP_SALT must be at least {MIN_SALT_LENGTH} bytes long"
                )
            salt = salt_text.encode()
        elif redis_url.startswith("memory://"):
            salt, ephemeral = secrets.token_bytes(32), True
        else:
            raise SettingsError(
                "RATEKEEPER_IP_SALT is required with a real Redis (RATEKEEPER_REDIS_URL is set)"
            )
        previous = env.get("RATEKEEPER_IP_SALT_PREVIOUS", "").encode()
        if previous:
            if not salt_text:
                raise SettingsError(
                    "RATEKEEPER_IP_SALT_PREVIOUS needs RATEKEEPER_IP_SALT (the new salt)"
                )
            if len(previous) < MIN_SALT_LENGTH:
                raise SettingsError(
                    f"RATEKEEPER_IP_SALT_PREVIOUS must be at least {MIN_SALT_LENGTH} bytes long"
                )
            if previous == salt:
                raise SettingsError("RATEKEEPER_IP_SALT_PREVIOUS must differ from "
                                    "RATEKEEPER_IP_SALT")
        admin_tokens = _parse_tokens(env.get("RATEKEEPER_ADMIN_TOKENS", ""),
                                     "RATEKEEPER_ADMIN_TOKENS")
        viewer_tokens = _parse_tokens(env.get("RATEKEEPER_VIEWER_TOKENS", ""),
                                      "RATEKEEPER_VIEWER_TOKENS")
        secrets_seen = [t.token for t in admin_tokens + viewer_tokens]
        if len(set(secrets_seen)) != len(secrets_seen):
            raise SettingsError("RATEKEEPER_ADMIN_TOKENS and RATEKEEPER_VIEWER_TOKENS must not "
                                "repeat a token")
        return cls(
            redis_url=redis_url,
            ip_salt=salt,
            ip_salt_previous=previous,
            ephemeral_salt=ephemeral,
            admin_tokens=admin_tokens,
            viewer_tokens=viewer_tokens,
            config_path=env.get("RATEKEEPER_CONFIG") or None,
            trusted_proxies=_parse_proxies(env.get("RATEKEEPER_TRUSTED_PROXIES")),
            key_prefix=_parse_prefix(env.get("RATEKEEPER_KEY_PREFIX", "rk")),
            redis_timeout_ms=_parse_int(env, "RATEKEEPER_REDIS_TIMEOUT_MS", 200, low=1),
            sync_interval_ms=_parse_int(env, "RATEKEEPER_SYNC_INTERVAL_MS", 1000, low=10),
            local_cache_size=_parse_int(env, "RATEKEEPER_LOCAL_CACHE_SIZE", 50_000, low=0),
            log_format=_parse_choice(env, "RATEKEEPER_LOG_FORMAT", ("text", "json")),  # type: ignore[arg-type]
            log_level=_parse_choice(env, "RATEKEEPER_LOG_LEVEL",
                                    ("INFO", "WARNING", "ERROR", "DEBUG")),
            request_timeout_ms=_parse_int(env, "RATEKEEPER_REQUEST_TIMEOUT_MS", 10_000, low=10),
            max_connections=_parse_int(env, "RATEKEEPER_MAX_CONNECTIONS", 0, low=0),
            warmup_ms=_parse_int(env, "RATEKEEPER_WARMUP_MS", 10_000, low=0),
            webhook_secret=env.get("RATEKEEPER_WEBHOOK_SECRET", "").encode(),
            origin_tokens=tuple(part.strip().encode() for part in
                                env.get("RATEKEEPER_ORIGIN_TOKEN", "").split(",")
                                if part.strip()),
        )


def _parse_tokens(text: str, variable: str = "RATEKEEPER_ADMIN_TOKENS") -> tuple[AdminToken, ...]:
    tokens: list[AdminToken] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, token = item.partition(":")
        if not sep or not name or not token:
            raise SettingsError(f"{variable} must be name:token[,name:token...]")
        tokens.append(AdminToken(name=name, token=token))
    return tuple(tokens)


def _parse_proxies(
    text: str | None,
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if text is None:
        return DEFAULT_TRUSTED_PROXIES
    nets = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise SettingsError(
                "RATEKEEPER_TRUSTED_PROXIES must be a comma-separated list of CIDRs"
            ) from None
    return tuple(nets)


def _parse_prefix(text: str) -> str:
    if not text or not all(c.isalnum() or c in "-_." for c in text) or len(text) > 32:
        raise SettingsError("RATEKEEPER_KEY_PREFIX must be 1-32 letters, digits, '-', '_' or '.'")
    return text


def _parse_choice(env: Mapping[str, str], name: str, options: tuple[str, ...]) -> str:
    raw = (env.get(name) or options[0]).strip()
    for option in options:
        if raw.lower() == option.lower():
            return option
    raise SettingsError(f"{name} must be one of " + ", ".join(options))


def _parse_int(env: Mapping[str, str], name: str, default: int, *, low: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer") from None
    if value < low:
        raise SettingsError(f"{name} must be at least {low}")
    return value
