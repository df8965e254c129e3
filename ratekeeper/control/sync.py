"""Keeping every process in step with admin changes: pub/sub, plus a periodic resync.

A change is written to Redis first, applied by the process that made it, then announced on
one channel (``<prefix>:events``). Every process subscribes: on a ``flags`` event it re-reads
the flags HASH (so the order in which messages arrive cannot matter); on a ``ban``,
``lift``, ``reset`` or ``refund`` it drops what its local cache knew about those subjects.
Every ``interval`` it re-reads the flags anyway, so a lost message leaves a flag stale for
that long at most, turns off flags past their expiry (once, whoever is first, with an audit
event), and restores the flags HASH from its last known state if Redis lost it (a restart
without persistence).

Every change but a flag's is also appended to a change log: a capped, expiring stream named
like the channel (keys and channels are apart in Redis). One script (``announce.lua``) appends
and publishes together, so every subscriber receives the changes in the log's order, each
message carrying its entry's id: a process that has seen entry N live has seen all before it.

When the channel is lost (Redis down, a failover, a dropped connection) the local cache goes on
answering. Each of its entries is a denial Redis gave, true until the deadline it recorded, and
during an outage that is the best knowledge there is: the alternative, a fail-open rule's
answer, would admit every abuser already known to be over its limit. Flags keep their last
known state too (only an expiry an admin set can turn one off). What the loss risks is a lift,
reset or refund made meanwhile by a process that still reaches Redis, which this one would not
hear of: the cache may deny that subject until its entry ends or the channel is back. Once
subscribed again, a process reads the log past the last entry it saw and applies what it
missed, which drops only the entries of the subjects those changes name (a ban, as live,
empties the cache); everything else it knew stands. It empties the cache instead when it cannot
be sure it missed nothing:

- the last entry it saw has left the log and the log has lost entries since (trimmed past it);
- the channel was down longer than ``REPLAY_HORIZON`` (the log may have expired meanwhile).

A log that is simply gone (Redis restarted without persistence) holds no change made since, so
the cache stands: the counters are gone too, and what it remembers is still the last word on
who went over what. (A change made in the moments between this process losing the channel and
Redis losing its data would be lost with the log: accepted.) Until the channel is first up the
cache neither answers nor learns, as there is no place in the log to catch up from.

On Redis Cluster a plain PUBLISH sent to any node reaches subscribers on every node (the
cluster bus broadcasts it), so one subscription to any node hears every change; sharded
pub/sub (SPUBLISH) would only reach one shard's subscribers, which is why it is not used. A PUBLISH
from a script (``announce.lua``, run on the log's node) is broadcast the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from redis.exceptions import RedisError

from ratekeeper.api.admin_wire import AuditEvent
from ratekeeper.control.audit import AuditLog
from ratekeeper.control.flagstore import EXPIRY_ACTOR, FlagStore
from ratekeeper.decision.cache import LocalCache
from ratekeeper.decision.flags import FlagBoard
from ratekeeper.errors import StoreUnavailable
from ratekeeper.storage.scripts import LuaScript, read_script
from ratekeeper.storage.storecall import store_call

__all__ = ["Event", "StateSync", "stop_tasks"]

log = logging.getLogger("ratekeeper.control.sync")

MAX_BACKOFF = 1.0  # seconds between attempts to subscribe again
SUBSCRIBE_TIMEOUT = 5.0
LOG_MAXLEN = 10_000  # about how many changes the log keeps (XADD MAXLEN ~)
LOG_TTL_MS = 3_600_000  # the log outlives its last change by this much
# A channel down longer than this may have missed changes whose log has expired since; half
# the log's life leaves room for a loss noticed late (a silent connection is noticed at a ping).
REPLAY_HORIZON = LOG_TTL_MS / 2000  # seconds
PAGE = 1000  # log entries read per XRANGE


class Event(msgspec.Struct, frozen=True, omit_defaults=True):
    """One announced change; subjects are hashes, never raw values."""

    kind: str  # "flags", "ban", "lift", "reset" or "refund"
    subjects: list[str] = []  # ban, lift: the subject hashes
    pairs: list[tuple[str, str]] = []  # reset, refund: (rule name, subject hash)
    id: str = ""  # its entry in the change log, as received (announce.lua adds it)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Event).decode


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _order(entry_id: str) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>") as something that sorts."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


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
        self.log_key = channel  # the change log: a stream named like the channel
        self.log_maxlen = LOG_MAXLEN
        self.caught_up = 0  # changes applied from the log after the channel came back
        self.emptied = 0  # times the cache was emptied because changes could have been missed
        self._announce = LuaScript(redis, "announce", read_script("announce"))
        self._tasks: list[asyncio.Task[None]] = []
        self._lost = False
        self._stopping = False
        self._placed = False  # whether _seen says where this process stands in the log
        self._seen: str | None = None  # the last log entry seen (None: none, or no log)
        self._down_since: float | None = None  # wall time the channel was found lost
        self._watched: Any = None  # the subscribed connection, whose reconnects we hear of

    @property
    def seen(self) -> str | None:
        """The id of the last change-log entry this process has seen, if any."""
        return self._seen

    async def start(self) -> None:
        """Load the flags (if Redis answers) and start listening and resyncing."""
        if self.listen:
            self.cache.active = False  # until the channel is first up
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
        """Apply ``event`` here and publish it to every other process (and, unless it is
        about flags, which are re-read on reconnecting anyway, append it to the log)."""
        self.apply(event)
        try:
            async with store_call():
                if event.kind == "flags":
                    await self.redis.publish(self.channel, _encode(event))
                else:
                    await self._announce([self.log_key], [_encode(event), self.channel,
                                                          self.log_maxlen, LOG_TTL_MS])
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
        if event.id:
            self._saw(event.id)
        if event.kind == "flags":
            try:
                await self.refresh()
            except StoreUnavailable:
                log.warning("could not re-read the flags after a change; the next resync will")

    async def _reconnected(self, connection: Any) -> None:
        # redis-py re-subscribes by itself after a dropped connection; what was published
        # in between is lost, so subscribe afresh and catch up from the log
        if connection is self._watched:
            self._lost = True

    def _went_down(self, why: str) -> None:
        if self.subscribed:
            log.warning("lost the %s channel (%s); the local cache goes on answering what "
                        "it knows, and changes made meanwhile are caught up when it is back",
                        self.channel, why)
        self.subscribed = False
        if self._down_since is None:
            self._down_since = self.wall()

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
                        self._went_down("reconnected")
                        break
                    if message is None:
                        await pubsub.ping()
                    elif message.get("type") == "message":
                        await self._handle(message["data"])
            except (RedisError, OSError, TimeoutError, StoreUnavailable) as exc:
                self._went_down(type(exc).__name__)
            except Exception:  # whatever went wrong, changes could now be missed
                log.exception("the %s listener failed; subscribing again", self.channel)
                self._went_down("listener failed")
            finally:
                if self._watched is not None:
                    # the pool hands the connection to other work, whose reconnects are not ours
                    self._watched.deregister_connect_callback(self._reconnected)
                    self._watched = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _subscribe(self, pubsub: Any) -> None:
        await pubsub.subscribe(self.channel)
        # wait for the confirmation, so no change after the catch-up below can be missed
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
            while True:
                message = await pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT)
                if message is not None and message.get("type") == "subscribe":
                    break
        self._lost = False
        connection = getattr(pubsub, "connection", None)
        if connection is not None and hasattr(connection, "register_connect_callback"):
            connection.register_connect_callback(self._reconnected)
            self._watched = connection
        await self._catch_up()
        await self.refresh()
        self.subscribed = True
        self.subscriptions += 1
        self.cache.active = True
        self._down_since = None

    def _saw(self, entry_id: str) -> None:
        if self._seen is None or _order(entry_id) > _order(self._seen):
            self._seen = entry_id

    async def _catch_up(self) -> None:
        """Subscribed (again): apply the changes logged while the channel was down, or
        empty the cache when some of them can no longer be known. Raises StoreUnavailable."""
        if not self._placed:  # first subscription: nothing is cached yet; note the log's end
            self.cache.clear()
            self._seen = await self._log_end()
            self._placed = True
            return
        down = self._down_since
        if down is not None and self.wall() - down > REPLAY_HORIZON:
            self._seen = await self._log_end()
            self._empty(f"the channel was down over {REPLAY_HORIZON:.0f} s")
            return
        missed = await self._missed()
        if missed is None:
            self._seen = await self._log_end()
            self._empty("changes since the last one seen have left the log")
            return
        for entry_id, event in missed:
            self.apply(event)
            self._saw(entry_id)
        self.caught_up += len(missed)
        if missed:
            log.info("applied %d changes made while the %s channel was down", len(missed),
                     self.channel)

    def _empty(self, why: str) -> None:
        self.cache.clear()
        self.emptied += 1
        log.warning("emptied the local cache on reconnecting: %s", why)

    async def _log_end(self) -> str | None:
        """The id of the log's last entry; None when there is no log."""
        async with store_call():
            last = await self.redis.xrevrange(self.log_key, "+", "-", count=1)
        return _text(last[0][0]) if last else None

    async def _missed(self) -> list[tuple[str, Event]] | None:
        """The changes logged after the last one seen, oldest first; None when some may
        have left the log."""
        key, seen = self.log_key, self._seen
        async with store_call():
            if seen is not None:
                first = await self.redis.xrange(key, seen, "+", count=PAGE)
                if first and _text(first[0][0]) == seen:
                    return _events((await self._read_on(first))[1:])
            # the entry seen is gone, or none was: either the log is a new one, all of it
            # written since (then all is applied), or it was trimmed past what was seen
            if not await self.redis.exists(key):
                return []
            info = await self.redis.xinfo_stream(key)
            added = info.get("entries-added")  # (Redis 7 and later)
            if added is None or int(added) != int(info["length"]):
                return None
            return _events(await self._read_on(await self.redis.xrange(key, "-", "+",
                                                                       count=PAGE)))

    async def _read_on(self, page: Sequence[Any]) -> list[Any]:
        """``page`` and the log's entries after it."""
        entries = list(page)
        while len(page) == PAGE:
            page = await self.redis.xrange(self.log_key, "(" + _text(page[-1][0]), "+",
                                           count=PAGE)
            entries += page
        return entries


def _events(entries: Sequence[Any]) -> list[tuple[str, Event]]:
    """Log entries as (id, change); an entry that cannot be read is skipped."""
    out: list[tuple[str, Event]] = []
    for entry_id, fields in entries:
        try:
            out.append((_text(entry_id), _decode(fields.get(b"e") or fields.get("e") or b"")))
        except msgspec.DecodeError:
            log.warning("ignoring an unreadable entry in the change log")
    return out
