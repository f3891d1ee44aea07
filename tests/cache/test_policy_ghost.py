"""The ghost policy: exact eviction order before and after ghost hits, its memory bound, the stateful model."""

from __future__ import annotations

import numpy as np
import pytest

from cachemgr.cache import Namespace, PrefixCache
from cachemgr.cache.policy import GhostPolicy, make_policy
from tests.cache.test_stateful import CacheMachine

NS = Namespace("m")


def put(cache: PrefixCache, tokens: list[int]) -> None:
    """One full request with page size 1: match, lease, allocate the rest, commit, release; then check()."""
    lease = cache.open_lease(NS, tokens)
    pages = cache.allocate(lease.lease_id, len(tokens) - lease.matched_len)
    assert pages is not None
    cache.commit(lease.lease_id, tokens, np.concatenate([lease.prefix_page_ids, pages]))
    cache.release(lease.lease_id)
    cache.check()


def cached_len(cache: PrefixCache, tokens: list[int]) -> int:
    return cache.match(NS, tokens).matched_len


def build(cache: PrefixCache) -> None:
    """Shared prefix [1]; conversation [10] continued by [11]; newcomers [20] then [30].

    Clock (open, commit): [1 10] 1-2, [1 20] 3-4, [1 10 11] 5-6, [1 30] 7-8. Then evict one page twice.
    """
    put(cache, [1, 10])
    put(cache, [1, 20])
    put(cache, [1, 10, 11])  # [11] continues [10], its only child: protected
    put(cache, [1, 30])  # [20] and [30] are new children of [1] beside others: branch leaves
    assert cache.evict(1) == 1
    assert cache.evict(1) == 1


def test_with_no_ghost_hit_it_is_lru() -> None:
    policy = GhostPolicy(step=1.0)
    cache = PrefixCache(8, page_size=1, policy=policy)
    build(cache)
    # [20] (last use 4) then [11] (6); [30] (8) stays: plain LRU, demotion still 0
    assert [cached_len(cache, t) for t in ([1, 20], [1, 10, 11], [1, 30])] == [1, 2, 2]
    assert policy.demotion == 0.0
    assert policy.num_ghosts == 2 and policy.num_ghost_pages == 2


def test_protected_ghost_hit_demotes_newcomers_below_a_kept_conversation() -> None:
    policy = GhostPolicy(step=1.0, max_scale=2.0, trust=1.0)  # fully trusted: bound 2x the mean gap
    cache = PrefixCache(8, page_size=1, policy=policy)
    build(cache)
    put(cache, [1, 10, 11, 12])  # clock 9: misses [11], a protected ghost last used at 6: gap 3
    assert policy.ghost_hits == [0, 0, 1]
    assert policy.demotion == 3.0  # step 1.0 * mean gap 3, within trust 1 * max_scale 2 * 3
    put(cache, [1, 40])  # clock 11-12: branch leaf, priority 12 - 3 = 9
    assert cache.evict(2) == 2
    # [30] (8 - 3 = 5) then [40] (9) before the protected [11 12] (10); LRU would trim [12] instead of [40]
    assert [cached_len(cache, t) for t in ([1, 30], [1, 10, 11, 12], [1, 40])] == [1, 4, 1]
    # [40] comes back one tick after its last use, sooner than protected leaves get evicted (age 2):
    # the demotion cost that hit, so it shrinks by one step of the mean gap
    put(cache, [1, 40])
    assert policy.ghost_hits == [1, 0, 1]
    assert policy.demotion == 3.0 - (0.98 * 3.0 + 0.02 * 1.0)


def test_lru_on_the_same_requests_keeps_the_newcomer() -> None:
    cache = PrefixCache(8, page_size=1, policy="lru")
    build(cache)
    put(cache, [1, 10, 11, 12])
    put(cache, [1, 40])
    assert cache.evict(2) == 2
    assert [cached_len(cache, t) for t in ([1, 30], [1, 10, 11, 12], [1, 40])] == [1, 3, 2]


def test_demotion_is_capped_at_trust_times_max_scale_times_the_mean_gap() -> None:
    policy = GhostPolicy(step=1.0)  # default trust 1/6 x max_scale 3: half the mean gap to start with
    cache = PrefixCache(8, page_size=1, policy=policy)
    build(cache)
    put(cache, [1, 10, 11, 12])  # the same protected ghost hit, gap 3: one step would be 3
    assert policy.demotion == 1.5


def test_ghost_record_is_bounded_by_the_pool() -> None:
    policy = GhostPolicy()
    cache = PrefixCache(4, page_size=1, policy=policy)
    for i in range(50):
        put(cache, [100 + i, 200 + i])  # every request evicts an older one: 2 pages per ghost
        assert policy.num_ghost_pages <= 4
    assert policy.num_ghosts == 2 and policy.num_ghost_pages == 4
    put(cache, [147, 247])  # evicted 3 requests ago: still a ghost, consumed by the hit
    assert policy.num_ghosts == 1 + 1  # the hit removed one, its own eviction added one
    assert sum(policy.ghost_hits) == 1


def test_bad_parameters_and_registry() -> None:
    assert isinstance(make_policy("ghost"), GhostPolicy)
    for kwargs in (
        {"step": 0.0},
        {"max_scale": -1.0},
        {"admit_every": 0},
        {"admit_below": 1.5},
        {"trust": 1.5},
        {"window_pages": 0},
        {"trust_down": 2.0},
    ):
        with pytest.raises(ValueError):
            GhostPolicy(**kwargs)  # type: ignore[arg-type]


class GhostCacheMachine(CacheMachine):
    """The reference-model machine of test_stateful with the ghost policy (check() after every step)."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = PrefixCache(12, page_size=2, policy=GhostPolicy(step=0.5))


GhostCacheMachine.TestCase.settings = CacheMachine.TestCase.settings
test_ghost_cache_against_reference_model = GhostCacheMachine.TestCase


def test_trust_follows_the_shadow_lru_comparison() -> None:
    """Every window of sampled pages, trust falls when the policy hit less than the shadow LRU on the same
    pages and grows otherwise; the demotion bound shrinks with it at once."""
    policy = GhostPolicy(trust=0.5, window_pages=4, tolerance=0.0, trust_up=0.125, trust_down=0.25)
    cache = PrefixCache(64, page_size=1, policy=policy)
    put(cache, [1, 2, 3, 4])  # 4 sampled pages (a pool this small samples all), no hits either way
    assert policy.trust == 0.625 and policy.shadow_totals == [4, 0, 0]
    put(cache, [1, 2, 3, 4])  # both hit all four: not behind, trust grows
    assert policy.trust == 0.75 and policy.shadow_totals == [8, 4, 4]
    cache.flush()  # the cache forgets, the shadow LRU (a model of what LRU would hold) does not
    policy.demotion = 10.0
    put(cache, [1, 2, 3, 4])  # the shadow hits 4, the cache 0: behind, trust falls
    assert policy.trust == 0.5 and policy.shadow_totals == [12, 8, 4]
    assert policy.demotion == 0.0  # bound: trust 0.5 x max_scale 3 x mean gap 0 (no ghost hit yet)
