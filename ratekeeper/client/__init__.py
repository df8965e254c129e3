"""Clients for the origin: ``AsyncClient`` (asyncio), ``SyncClient`` (WSGI) and middleware.

Names are imported when first used: ``from ratekeeper.client import SyncClient`` loads the
blocking client alone, and no client loads a server module.
"""

from __future__ import annotations

from ratekeeper.lazy import exports

# each public name, and the module that defines it
_HOMES = {
    "AsyncClient": "ratekeeper.client.aio",
    "Check": "ratekeeper.client.base",
    "ClearResult": "ratekeeper.api.wire",
    "ClientError": "ratekeeper.client.base",
    "Decision": "ratekeeper.api.wire",
    "FailMode": "ratekeeper.client.base",
    "FallbackDecision": "ratekeeper.client.base",
    "FlagStates": "ratekeeper.api.wire",
    "OriginFlag": "ratekeeper.api.wire",
    "RefundResult": "ratekeeper.api.wire",
    "RequestRejected": "ratekeeper.client.base",
    "SidecarUnavailable": "ratekeeper.client.base",
    "SyncClient": "ratekeeper.client.sync",
}

__all__ = sorted(_HOMES, key=str.casefold)
__getattr__, __dir__ = exports(__name__, _HOMES)
