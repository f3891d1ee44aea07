"""Prometheus metrics: names and values read from a real PrefixCache and the daemon at scrape time."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachemgr.cache import Namespace
from cachemgr.metrics import MAX_OUTCOMES, Metrics
from tests.admin.conftest import MODEL, NUM_PAGES, FakeDaemon, cache_prompt


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # creation timestamps of client-side counters: not deterministic
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_gauges_and_counters_are_read_at_scrape_time(daemon: FakeDaemon) -> None:
    metrics = Metrics(daemon)
    cache = daemon.cache
    cache_prompt(cache, list(range(1, 14)))  # 3 pages; open_lease does not count as a query
    cache.match(Namespace(MODEL), list(range(1, 11)))  # 10 queried, 8 hit
    lease = cache.open_lease(Namespace(MODEL), [*range(1, 9), 60, 61, 62, 63])  # locks 2 of A's pages
    assert cache.allocate(lease.lease_id, 1) is not None
    cache.pin(Namespace(MODEL), list(range(1, 13)))
    cache_prompt(cache, [5] * 8)
    assert cache.evict(1) == 1
    got = samples(metrics)
    gauges = {key: value for key, value in got.items() if not key[0].startswith("radixkv_requests")}
    stats = cache.stats()
    assert (stats.tokens_queried, stats.tokens_hit) == (10, 8)
    assert gauges == {
        ("radixkv_prompt_tokens_queried_total", ()): 10.0,
        ("radixkv_prompt_tokens_hit_total", ()): 8.0,
        ("radixkv_cache_evicted_pages_total", ()): 1.0,
        ("radixkv_kv_pages", (("state", "free"),)): NUM_PAGES - 4.0 - 1.0,  # minus cached, leased
        ("radixkv_kv_pages", (("state", "cached"),)): 4.0,
        ("radixkv_kv_pages", (("state", "leased"),)): 1.0,
        ("radixkv_kv_pages", (("state", "locked"),)): 2.0,
        ("radixkv_kv_pages", (("state", "pinned"),)): 3.0,
        ("radixkv_kv_pool_pages", ()): float(NUM_PAGES),
        ("radixkv_cache_nodes", ()): 3.0,
        ("radixkv_leases", ()): 1.0,
        ("radixkv_queue_depth", ()): 3.0,
        ("radixkv_workers", ()): 2.0,
        ("radixkv_ready_workers", ()): 1.0,
        ("radixkv_running_requests", ()): 1.0,
        **{key: value for key, value in got.items() if "_seconds" in key[0]},
    }
    cache.release(lease.lease_id)
    assert samples(metrics)[("radixkv_kv_pages", (("state", "leased"),))] == 0.0


def test_latency_histograms_and_outcomes(daemon: FakeDaemon) -> None:
    metrics = Metrics(daemon)
    for seconds in (0.004, 0.02, 0.02, 3.0):
        metrics.observe_ttft(seconds)
    metrics.observe_e2e(0.3)
    metrics.observe_e2e(700.0)
    for outcome in ("stop", "stop", "length", "abort"):
        metrics.count_request(outcome)
    got = samples(metrics)
    ttft = "radixkv_time_to_first_token_seconds"
    assert got[(f"{ttft}_bucket", (("le", "0.005"),))] == 1.0
    assert got[(f"{ttft}_bucket", (("le", "0.025"),))] == 3.0
    assert got[(f"{ttft}_bucket", (("le", "2.5"),))] == 3.0
    assert got[(f"{ttft}_bucket", (("le", "5.0"),))] == 4.0
    assert got[(f"{ttft}_bucket", (("le", "+Inf"),))] == 4.0
    assert got[(f"{ttft}_count", ())] == 4.0
    assert abs(got[(f"{ttft}_sum", ())] - 3.044) < 1e-9
    e2e = "radixkv_e2e_request_latency_seconds"
    assert got[(f"{e2e}_bucket", (("le", "0.25"),))] == 0.0
    assert got[(f"{e2e}_bucket", (("le", "0.5"),))] == 1.0
    assert got[(f"{e2e}_bucket", (("le", "600.0"),))] == 1.0
    assert got[(f"{e2e}_count", ())] == 2.0
    requests = {k[1]: v for k, v in got.items() if k[0] == "radixkv_requests_total"}
    assert requests == {
        (("outcome", "stop"),): 2.0,
        (("outcome", "length"),): 1.0,
        (("outcome", "abort"),): 1.0,
    }
    with pytest.raises(ValueError, match="must be >= 0"):
        metrics.observe_ttft(-0.1)
    with pytest.raises(ValueError, match="must be >= 0"):
        metrics.observe_e2e(-0.1)
    assert samples(metrics)[(f"{ttft}_count", ())] == 4.0


def test_labels_never_carry_caller_text(daemon: FakeDaemon) -> None:
    metrics = Metrics(daemon)
    metrics.count_request("You are a helpful assistant. Secret: 42")
    metrics.count_request("STOP")
    for i in range(MAX_OUTCOMES + 5):
        metrics.count_request(f"outcome_{i}")
    got = samples(metrics)
    outcomes = {dict(k[1])["outcome"] for k in got if k[0] == "radixkv_requests_total"}
    assert outcomes == {f"outcome_{i}" for i in range(MAX_OUTCOMES)} | {"other"}
    assert got[("radixkv_requests_total", (("outcome", "other"),))] == 7.0
    body, _ = metrics.render()
    assert b"Secret" not in body and b"helpful" not in body


def test_registries_are_independent_and_a_failing_daemon_does_not_break_the_scrape(
    daemon: FakeDaemon,
) -> None:
    first, second = Metrics(daemon), Metrics(daemon)  # a global registry would refuse the second
    first.count_request("stop")
    assert ("radixkv_requests_total", (("outcome", "stop"),)) not in samples(second)

    def broken() -> dict[str, int]:
        raise RuntimeError("stats unavailable")

    daemon.stats = broken  # type: ignore[method-assign]
    got = samples(first)
    assert ("radixkv_queue_depth", ()) not in got
    assert got[("radixkv_kv_pool_pages", ())] == float(NUM_PAGES)
    assert got[("radixkv_requests_total", (("outcome", "stop"),))] == 1.0
