"""Adapters that let an application's own rate-limiting interface call ratekeeper:
``ratekeeper.integrations.warehouse`` stands where Warehouse's ``RateLimiter`` stands.

They sit on the clients alone (an import contract holds them to it), so importing one loads no
server module.
"""

from __future__ import annotations
