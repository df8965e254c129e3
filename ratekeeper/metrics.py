"""Prometheus metrics: what ratekeeper decides, how Redis answers, what the switches say.

Labels are drawn only from the config (actions, rules, flags) and fixed vocabularies, never
from a subject: no IP, hash or user name is ever a label value, so cardinality is bounded by
the config. With several workers the values live in PROMETHEUS_MULTIPROC_DIR (set by the CLI
before any worker starts, because prometheus_client picks its storage when first imported)
and /metrics on any worker reports the sum over all of them.

Decisions and local-cache answers are counted in plain dicts on the request path and added
to the Prometheus counters by ``flush``: at every scrape of this process, once a second and
when the server stops (the server runs ``flush_forever``), so another worker's counts reach
/metrics within about a second. A counter's ``inc`` takes a lock (and in multiprocess mode
writes a memory-mapped file); a dict entry costs a fraction of that, and the path runs once
per decision. Each flush also adds what it moved to a second tally, per (action, rule,
outcome), which the traffic recorder takes once a second (``take_traffic``) for the shared
counts in Redis behind the tripwires and the admin page's chart: the request path pays
nothing more for them.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

__all__ = ["FLUSH_SECONDS", "OUTCOMES", "Metrics"]

OUTCOMES = ("allowed", "rate_limited", "disabled", "banned", "shadow", "degraded")
BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}
FLUSH_SECONDS = 1.0  # pending decision counts reach the Prometheus counters this often
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """Every metric of one process; exposition merges all workers in multiprocess mode."""

    def __init__(self) -> None:
        # Imported here, not at module level: the multiprocess switch is read on first import.
        import prometheus_client as prom

        self._prom = prom
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.registry = None if self.multiprocess_dir else prom.CollectorRegistry()
        kwargs: dict[str, Any] = {"registry": self.registry}
        self.decisions = prom.Counter(
            "ratekeeper_decisions", "Decisions by action, deciding rule and outcome",
            ["action", "rule", "outcome"], **kwargs)
        self.redis_seconds = prom.Histogram(
            "ratekeeper_redis_seconds", "Time of Redis script calls", ["op"],
            buckets=LATENCY_BUCKETS, **kwargs)
        self.redis_errors = prom.Counter(
            "ratekeeper_redis_errors", "Redis calls that failed or timed out", ["op", "error"],
            **kwargs)
        self.breaker = prom.Gauge(
            "ratekeeper_circuit_breaker_state",
            "Redis circuit breaker: 0 closed, 1 half-open, 2 open (worst worker)",
            multiprocess_mode="livemax", **kwargs)
        self.flags = prom.Gauge(
            "ratekeeper_flag_enabled", "Kill switch state as this process knows it (1 = on)",
            ["flag"], multiprocess_mode="livemax", **kwargs)
        self.cache_hits = prom.Counter(
            "ratekeeper_local_cache_hits", "Decisions answered from the local cache", ["kind"],
            **kwargs)
        self.alerts_sent = prom.Counter(
            "ratekeeper_alerts_sent", "Alerts a webhook accepted", **kwargs)
        self.alerts_dropped = prom.Counter(
            "ratekeeper_alerts_dropped",
            "Alerts given up: the queue was full, or every attempt failed", ["reason"],
            **kwargs)
        self.tripwire_trips = prom.Counter(
            "ratekeeper_tripwire_trips", "Tripwires tripped (shadow: recorded only)",
            ["tripwire", "shadow"], **kwargs)
        # labelled children by their label values: ``labels()`` validates and hashes its
        # arguments on every call, and the hot path counts every decision
        self._children: dict[tuple[Any, ...], Any] = {}
        # counted on the request path, not yet in the counters above (``flush``)
        self._decided: dict[tuple[str, str, str], int] = {}
        self._hits: dict[str, int] = {}
        # flushed, not yet taken by the traffic recorder (``take_traffic``)
        self._traffic: dict[tuple[str, str, str], int] = {}
        self.tapped = False  # whether anything takes the traffic (else it is not kept)

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def decision(self, action: str, rule: str, outcome: str, count: int = 1) -> None:
        """Count ``count`` decisions; ``rule`` is the rule that decided them, or ''."""
        key = (action, rule, outcome)
        decided = self._decided
        decided[key] = decided.get(key, 0) + count

    def redis_call(self, op: str, seconds: float) -> None:
        """Observe one Redis call's time."""
        self._child(self.redis_seconds, op).observe(seconds)

    def redis_error(self, op: str, error: str) -> None:
        """Count a failed Redis call by the exception's class name."""
        self._child(self.redis_errors, op, error).inc()

    def breaker_state(self, state: str) -> None:
        """Record the circuit breaker's state (closed, half-open, open)."""
        self.breaker.set(BREAKER_STATES[state])

    def flag_state(self, name: str, enabled: bool) -> None:
        """Record a kill switch's state."""
        self.flags.labels(name).set(1 if enabled else 0)

    def cache_hit(self, kind: str) -> None:
        """Count a decision the local cache answered (``banned``, ``limited``...)."""
        hits = self._hits
        hits[kind] = hits.get(kind, 0) + 1

    def flush(self) -> None:
        """Add what was counted since the last flush to the Prometheus counters."""
        decided, hits = self._decided, self._hits
        if decided:
            self._decided = {}
            traffic = self._traffic if self.tapped else None
            for key, count in decided.items():
                self._child(self.decisions, *key).inc(count)
                if traffic is not None:
                    traffic[key] = traffic.get(key, 0) + count
        if hits:
            self._hits = {}
            for kind, count in hits.items():
                self._child(self.cache_hits, kind).inc(count)

    def take_traffic(self) -> dict[tuple[str, str, str], int]:
        """Decisions per (action, rule, outcome) since the last take."""
        self.tapped = True
        self.flush()
        traffic, self._traffic = self._traffic, {}
        return traffic

    def alert_sent(self) -> None:
        """Count an alert a webhook accepted."""
        self.alerts_sent.inc()

    def alert_dropped(self, reason: str) -> None:
        """Count an alert given up (``queue_full`` or ``undelivered``)."""
        self._child(self.alerts_dropped, reason).inc()

    def tripped(self, tripwire: str, shadow: bool) -> None:
        """Count a tripwire's trip."""
        self._child(self.tripwire_trips, tripwire, "true" if shadow else "false").inc()

    async def flush_forever(self, interval: float = FLUSH_SECONDS) -> None:
        """``flush`` every ``interval`` seconds until cancelled (then once more)."""
        try:
            while True:
                await asyncio.sleep(interval)
                self.flush()
        finally:
            self.flush()

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every metric (all workers' in multiprocess mode)."""
        self.flush()
        prom = self._prom
        if self.multiprocess_dir:
            from prometheus_client import multiprocess

            registry = prom.CollectorRegistry()
            multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
                registry, path=self.multiprocess_dir)
        else:
            assert self.registry is not None
            registry = self.registry
        return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (call from the supervisor)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
