"""Keeping every process in step with admin changes: pub/sub, plus a periodic resync.

A change is written to Redis first, applied by the process that made it, then announced on
one channel (``<prefix>:events``). Every process subscribes: on a ``flags`` event it re-reads
the flags HASH (so the order in which messages arrive cannot matter); on a ``ban``,
``lift``, ``reset`` or ``refund`` it drops what its local cache knew about those subjects.
Every ``interval`` it re-reads the flags anyway, so a lost message leaves a flag stale for
that long at most, turns off flags past their expiry (once, whoever is first, with an audit
event), and restores the flags HASH from its last known state if Redis lost it (a restart
without persistence).

When Redis is unreachable nothing changes here: flags keep their last known state (only an
expiry an admin set can turn one off) and the local cache stops answering, because lifts and
resets could be missed while the channel is down; it starts empty when the channel is back.

On Redis Cluster a plain PUBLISH sent to any node reaches subscribers on every node (the
cluster bus broadcasts it), so one subscription to any node hears every change; sharded
pub/sub (SPUBLISH) would only reach one shard's subscribers, which is why it is not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from redis.exceptions import RedisError

from .admin_wire import AuditEvent
from .audit import AuditLog
from .errors import StoreUnavailable
from .flags import FlagBoard
from .flagstore import EXPIRY_ACTOR, FlagStore
from .localcache import LocalCache
from .storecall import store_call

__all__ = ["Event", "StateSync", "stop_tasks"]

log = logging.getLogger("ratekeeper.sync")

MAX_BACKOFF = 1.0  # seconds between attempts to subscribe again
SUBSCRIBE_TIMEOUT = 5.0


class Event(msgspec.Struct, frozen=True, omit_defaults=True):
    """One announced change; subjects are hashes, never raw values."""

    kind: str  # "flags", "ban", "lift", "reset" or "refund"
    subjects: list[str] = []  # ban, lift: the subject hashes
    pairs: list[tuple[str, str]] = []  # reset, refund: (rule name, subject hash)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Event).decode


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have ended.

    Cancelled again until they do: a cancel that lands inside redis-py's
    ``get_message(timeout=)``, or just as an ``asyncio.timeout`` in the task fires (Python
    3.11), can be swallowed, and the task would go on.
    """
    for task in tasks:
        task.cancel()
    while pending := [task for task in tasks if not task.done()]:
        await asyncio.wait(pending, timeout=0.1)
        for task in pending:
            task.cancel()
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("a background task ended with %r", task.exception())


class StateSync:
    """Subscribes to admin changes and resyncs flags; one per process."""

    def __init__(self, redis: Any, channel: str, flagstore: FlagStore, board: FlagBoard,
                 cache: LocalCache, audit: AuditLog, *, wall: Callable[[], float],
                 interval: float, listen: bool = True) -> None:
        self.redis = redis
        self.channel = channel
        self.flagstore = flagstore
        self.board = board
        self.cache = cache
        self.audit = audit
        self.wall = wall
        self.interval = interval
        self.listen = listen
        self.subscribed = False
        self.subscriptions = 0  # how many times the channel was (re)established
        self._tasks: list[asyncio.Task[None]] = []
        self._lost = False
        self._stopping = False

    async def start(self) -> None:
        """Load the flags (if Redis answers) and start listening and resyncing."""
        if self.listen:
            self.cache.active = False  # until the channel is up
        try:
            await self.refresh()
        except StoreUnavailable:
            log.warning("flags could not be read at start: every flag is off until Redis "
                        "answers")
        if self.listen:
            self._tasks.append(asyncio.create_task(self._listen_forever()))
        self._tasks.append(asyncio.create_task(self._resync_forever()))

    async def stop(self) -> None:
        """Stop listening and resyncing."""
        self._stopping = True
        await stop_tasks(self._tasks)
        self._tasks.clear()

    async def refresh(self) -> None:
        """Re-read every flag; restore them if Redis lost them. Raises StoreUnavailable."""
        states = await self.flagstore.load()
        if states is None:
            known = self.board.recorded()
            if not (self.board.seen_in_store and known):
                return  # nothing was ever set: every flag is off
            if await self.flagstore.put(None, known):
                log.warning("Redis had lost the flags; restored %d from this process's last "
                            "known state", len(known))
                await self.audit.record(AuditEvent(
                    at=self.wall(), actor=EXPIRY_ACTOR, kind="flags-restored",
                    target="flags", detail={"flags": {s.name: s.enabled for s in known}}))
                await self.announce(Event(kind="flags"))
            states = await self.flagstore.load()  # ours, or what another process restored
            if states is None:
                return
        self.board.seen_in_store = True
        self.board.replace(states)

    async def expire_due(self) -> None:
        """Turn off flags past their expiry; the process that does it records it."""
        now = self.wall()
        for state in self.board.all():
            if state.enabled and state.expires_at is not None and state.expires_at <= now:
                off = await self.flagstore.expire(state, now)
                if off is None:
                    continue
                self.board.update(off)
                await self.audit.record(AuditEvent(
                    at=now, actor=EXPIRY_ACTOR, kind="flag-expired", target=state.name,
                    detail={"enabled": False, "expires_at": state.expires_at}))
                await self.announce(Event(kind="flags"))

    def apply(self, event: Event) -> None:
        """What an event changes in this process's cache."""
        if event.kind == "ban":
            # a new ban outranks what the cache knows (a limit denial says rate_limited, Redis
            # now says banned), and a shorter ban may replace a longer one: start afresh
            self.cache.clear()
        elif event.kind == "lift":
            self.cache.forget_subjects(event.subjects)
        elif event.kind in ("reset", "refund"):
            self.cache.forget_rules(event.pairs)

    async def announce(self, event: Event) -> bool:
        """Apply ``event`` here and publish it to every other process."""
        self.apply(event)
        try:
            async with store_call():
                await self.redis.publish(self.channel, _encode(event))
        except StoreUnavailable:
            log.error("could not announce a %s change; other processes see it at their "
                      "next resync (flags) or when their cache entries end", event.kind)
            return False
        return True

    async def resync(self) -> None:
        """One round of the periodic work. Raises StoreUnavailable."""
        await self.refresh()
        await self.expire_due()
        self.cache.sweep()

    async def _resync_forever(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.interval)
            try:
                await self.resync()
            except StoreUnavailable:
                log.debug("resync skipped: Redis is unavailable; keeping the last known flags")
            except Exception:  # never let one bad round end the resyncs
                log.exception("resync failed")

    async def _handle(self, data: Any) -> None:
        try:
            event = _decode(data)
        except msgspec.DecodeError:
            log.warning("ignoring an unreadable message on %s", self.channel)
            return
        self.apply(event)
        if event.kind == "flags":
            try:
                await self.refresh()
            except StoreUnavailable:
                log.warning("could not re-read the flags after a change; the next resync will")

    async def _reconnected(self, connection: Any) -> None:
        # redis-py re-subscribes by itself after a dropped connection; what was published
        # in between is lost, so start over as if newly subscribed
        self._lost = True
        self.cache.clear()

    async def _listen_forever(self) -> None:
        backoff = 0.05
        while not self._stopping:
            pubsub = self.redis.pubsub()
            try:
                await self._subscribe(pubsub)
                backoff = 0.05
                while not self._stopping:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=self.interval)
                    if self._lost:
                        self._lost = False
                        self.subscriptions += 1
                        await self.refresh()
                    if message is None:
                        await pubsub.ping()
                    elif message.get("type") == "message":
                        await self._handle(message["data"])
            except (RedisError, OSError, TimeoutError, StoreUnavailable) as exc:
                if self.subscribed:
                    log.warning("lost the %s channel (%s); the local cache is off until it "
                                "is back", self.channel, type(exc).__name__)
                self.subscribed = False
                self.cache.active = False
            except Exception:  # whatever went wrong, invalidations could now be missed
                log.exception("the %s listener failed; subscribing again", self.channel)
                self.subscribed = False
                self.cache.active = False
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _subscribe(self, pubsub: Any) -> None:
        await pubsub.subscribe(self.channel)
        # wait for the confirmation, so no change after the refresh below can be missed
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
            while True:
                message = await pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT)
                if message is not None and message.get("type") == "subscribe":
                    break
        connection = getattr(pubsub, "connection", None)
        if connection is not None and hasattr(connection, "register_connect_callback"):
            connection.register_connect_callback(self._reconnected)
        self.cache.clear()
        await self.refresh()
        self.subscribed = True
        self.subscriptions += 1
        self.cache.active = True
        self._lost = False
