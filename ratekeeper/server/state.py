"""A worker's live state: the store, limiter, flag board and the checker of the loaded config.

``Runtime`` lives in the application (``RUNTIME``); a config reload builds a new checker and
swaps it in whole (``reload_config``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from ratekeeper.config.rules import Config, load_config
from ratekeeper.decision.cache import LocalCache
from ratekeeper.decision.checker import Checker
from ratekeeper.decision.flags import FlagBoard
from ratekeeper.decision.top import TopDenials
from ratekeeper.errors import ConfigError
from ratekeeper.identity.keys import Keyspace
from ratekeeper.metrics import Metrics
from ratekeeper.settings import Settings
from ratekeeper.storage.limiter import Limiter
from ratekeeper.storage.store import Store

__all__ = ["RUNTIME", "STOPPING", "Runtime", "build_checker", "reload_config"]

log = logging.getLogger("ratekeeper.server")


@dataclass(slots=True)
class Runtime:
    """The live state of one process; ``checker`` is swapped whole on a config reload."""

    settings: Settings
    store: Store
    limiter: Limiter
    flags: FlagBoard
    checker: Checker
    metrics: Metrics
    cache: LocalCache | None = None  # known banned / over-limit subjects, shared by reloads
    denials: TopDenials | None = None  # counts for GET /v1/admin/top, shared by reloads


RUNTIME = web.AppKey("runtime", Runtime)
# set by the runner when the worker drains: every answer then closes its connection
STOPPING = web.AppKey("stopping", asyncio.Event)


def build_checker(config: Config, settings: Settings, limiter: Limiter,
                  flags: FlagBoard, *, cache: LocalCache | None = None,
                  denials: TopDenials | None = None,
                  wall: Callable[[], float] = time.time) -> Checker:
    """A Checker for ``config`` sharing this process's store and flag state."""
    keyspace = Keyspace(settings.ip_salt, prefix=settings.key_prefix, grouping=config.ip,
                        previous_salt=settings.ip_salt_previous or None)
    if cache is not None:
        cache.clear()  # what it knew was decided under the previous rules
    return Checker(config, keyspace, limiter, flags, cache=cache, denials=denials,
                   metrics=limiter.metrics, wall=wall)


def reload_config(app: web.Application, path: str) -> bool:
    """Swap in the rules of ``path`` whole; when it is bad, log why and keep the current ones."""
    runtime = app[RUNTIME]
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("reload: %s", line)
        log.error("reload: %s is invalid; still serving the rules loaded before", path)
        return False
    runtime.checker = build_checker(config, runtime.settings, runtime.limiter, runtime.flags,
                                    cache=runtime.cache, denials=runtime.denials,
                                    wall=runtime.checker.wall)
    log.info("reload: now serving %s (%d rules, %d actions)", path, len(config.rules),
             len(config.actions))
    return True
