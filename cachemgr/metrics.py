"""Prometheus metrics for the daemon, on a registry of its own (never the process-global one).

Two kinds of values:
- read at scrape time from `daemon.cache.stats()` and `daemon.stats()` by a custom collector (page
  counts, queue depth, workers, and the cache's own cumulative counters), so the hot path pays nothing;
- recorded by the daemon as things happen: latency histograms and requests by outcome.

No label ever comes from user input (prompt text, model names from requests, API keys): the only labels
are the fixed page states and the daemon's own outcome names, which are checked and capped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

PREFIX = "radixkv"
# Seconds. Time to first token spans a cache hit on a tiny model (ms) to a cold 100k-token prefill (s).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Outcomes are the daemon's own words ("stop", "length", "abort", "error", "overloaded", ...); the
# cap keeps a bug that passes something else from growing the series without bound.
_OUTCOME_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_OUTCOMES = 32
OTHER_OUTCOME = "other"

# (metric suffix, CacheStats field, help)
_CACHE_COUNTERS = (
    ("prompt_tokens_queried", "tokens_queried", "Prompt tokens looked up in the prefix cache."),
    ("prompt_tokens_hit", "tokens_hit", "Prompt tokens found in the prefix cache (not recomputed)."),
    ("cache_evicted_pages", "evictions", "KV pages evicted from the prefix cache."),
)
_PAGE_STATES = ("free", "cached", "leased", "locked", "pinned")
# (metric suffix, daemon.stats() key, help)
_DAEMON_GAUGES = (
    ("queue_depth", "queue_depth", "Requests waiting to be dispatched to a worker."),
    ("workers", "workers", "Registered compute workers."),
    ("ready_workers", "ready_workers", "Registered workers that have warmed up and take requests."),
    ("running_requests", "running", "Requests dispatched to a worker and not finished."),
)


class _ScrapeCollector(Collector):
    """Reads the daemon's state on every scrape. Runs in whatever thread serves /metrics; the daemon's
    stats methods only read a few counters, so this is safe from the event loop thread (aiohttp)."""

    def __init__(self, daemon: Any) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[Metric]:
        try:
            cache_stats = self._daemon.cache.stats()
        except Exception:  # a scrape must never take the daemon down; the gap shows in the graphs
            logger.exception("metrics: cache.stats() failed")
        else:
            yield from self._cache_metrics(cache_stats)
        try:
            daemon_stats = self._daemon.stats()
        except Exception:
            logger.exception("metrics: daemon.stats() failed")
        else:
            yield from self._daemon_metrics(daemon_stats)

    def _cache_metrics(self, stats: Any) -> Iterator[Metric]:
        for suffix, field, doc in _CACHE_COUNTERS:
            counter = CounterMetricFamily(f"{PREFIX}_{suffix}", doc)
            counter.add_metric([], float(getattr(stats, field)))
            yield counter
        pages = GaugeMetricFamily(
            f"{PREFIX}_kv_pages",
            "KV pages by state: free + cached + leased = pool; locked and pinned are subsets of cached.",
            labels=["state"],
        )
        for state in _PAGE_STATES:
            pages.add_metric([state], float(getattr(stats, state)))
        yield pages
        yield GaugeMetricFamily(
            f"{PREFIX}_kv_pool_pages", "KV pages in the pool (all states).", value=float(stats.num_pages)
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_cache_nodes", "Nodes in the radix tree.", value=float(stats.num_nodes)
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_leases", "Live leases (requests holding pages).", value=float(stats.num_leases)
        )

    def _daemon_metrics(self, stats: dict[str, Any]) -> Iterator[Metric]:
        for suffix, key, doc in _DAEMON_GAUGES:
            if key not in stats:
                continue
            value = stats[key]
            # `workers` may be a count or a collection of worker records.
            number = len(value) if isinstance(value, list | tuple | dict) else value
            yield GaugeMetricFamily(f"{PREFIX}_{suffix}", doc, value=float(number))


class Metrics:
    """The daemon's metrics. Owns its CollectorRegistry; pass the object to the daemon (for the
    observe/count hooks) and to the HTTP app (for /metrics).

    observe_ttft / observe_e2e / count_request change counters and histograms; render() reads only.
    All methods are cheap and thread-safe (prometheus_client locks per metric).
    """

    def __init__(self, daemon: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._known_outcomes: set[str] = set()
        self._ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self._e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self._requests = Counter(
            f"{PREFIX}_requests",
            "Finished requests by outcome (stop, length, abort, error, ...).",
            labelnames=["outcome"],
            registry=self.registry,
        )
        self.registry.register(_ScrapeCollector(daemon))

    def observe_ttft(self, seconds: float) -> None:
        """Record one request's time to first token. Raises ValueError for a negative duration."""
        if seconds < 0:
            raise ValueError(f"time to first token must be >= 0, got {seconds}")
        self._ttft.observe(seconds)

    def observe_e2e(self, seconds: float) -> None:
        """Record one request's end-to-end latency. Raises ValueError for a negative duration."""
        if seconds < 0:
            raise ValueError(f"end-to-end latency must be >= 0, got {seconds}")
        self._e2e.observe(seconds)

    def count_request(self, outcome: str) -> None:
        """Count one finished request. `outcome` must be a short lowercase identifier chosen by the
        daemon; anything else, and any outcome past the first MAX_OUTCOMES distinct ones, is counted
        as "other" so no caller can create unbounded or user-controlled label values."""
        if outcome not in self._known_outcomes:
            if not _OUTCOME_RE.fullmatch(outcome) or len(self._known_outcomes) >= MAX_OUTCOMES:
                logger.warning("metrics: outcome %.40r counted as %r", outcome, OTHER_OUTCOME)
                outcome = OTHER_OUTCOME
            else:
                self._known_outcomes.add(outcome)
        self._requests.labels(outcome=outcome).inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric: (body, content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
