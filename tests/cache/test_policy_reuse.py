"""The reuse policy: leaf classes, the gap model's keep times, learned eviction order, bounds, the stateful model."""

from __future__ import annotations

import numpy as np
import pytest

from cachemgr.cache import Namespace, PrefixCache
from cachemgr.cache.node import TreeNode
from cachemgr.cache.policy import ReusePolicy, make_policy
from cachemgr.cache.policy_gaps import EDGES, GapStats, best_keep, bucket_of, uniform_keep
from cachemgr.cache.policy_reuse import NUM_CLASSES, leaf_class
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


def node_at(cache: PrefixCache, tokens: list[int]) -> TreeNode:
    node = cache._roots[NS]
    for page in range(len(tokens)):
        key = np.asarray(tokens[page : page + 1], dtype=np.int32).tobytes()
        if key in node.children:
            node = node.children[key]
    return node


def test_leaf_classes_from_kind_depth_and_size() -> None:
    cache = PrefixCache(16, page_size=1, policy=ReusePolicy())
    put(cache, [1, 2])  # [1 2]: beside nothing under the root: branch, depth 0, 2 pages
    assert leaf_class(node_at(cache, [1, 2])) == (0 * 7 + 0) * 6 + 1
    put(cache, [1, 2, 3])  # [3] continues [1 2], its parent's only child: continuation, depth 2, 1 page
    assert leaf_class(node_at(cache, [1, 2, 3])) == (1 * 7 + 1) * 6 + 0
    put(cache, [1, 2, 3])  # used again once
    assert leaf_class(node_at(cache, [1, 2, 3])) == (2 * 7 + 1) * 6 + 0
    put(cache, [1, 2, 3])
    put(cache, [1, 2, 3])  # used 3 times: kind "2-3"
    assert leaf_class(node_at(cache, [1, 2, 3])) == (3 * 7 + 1) * 6 + 0
    assert NUM_CLASSES == 5 * 7 * 6


def test_gap_buckets_and_keep_times_exact() -> None:
    assert [bucket_of(t) for t in (0, 1, 2, 3, 1000)] == [0, 2, 3, 4, 19]
    stats = GapStats([0, 1], prior=0.0, decay=0.5)
    for _ in range(10):
        stats.add(0, 3, True)  # class 0: always back after 3 ticks (bucket 4, [3, 4.66))
        stats.add(1, 1000, False)  # class 1: never back within 1000 ticks
    hits, occupancy = stats.curves()
    assert hits[0, 4] == 0.0 and hits[0, 5] == 1.0  # counted at the end of its bucket
    assert hits[1].max() == 0.0
    assert occupancy[1, 5] == EDGES[5]  # survival 1 throughout: occupancy = time
    weights = np.array([1.0, 1.0])
    keep = best_keep(hits, occupancy, weights, budget=10.0)
    assert keep.tolist() == [EDGES[5], 0.0]  # keep class 0 until its reuse, drop class 1 at once
    flat = uniform_keep(occupancy, weights, budget=10.0)
    # one TTL for both fills the budget, to the bisection's resolution (2**28 ticks / 2**40)
    assert occupancy[0, 5] + flat == pytest.approx(10.0, abs=1e-3)
    stats.decay_all()
    assert stats.events[0, 4] == 5.0 and stats.censored[1, 19] == 5.0
    with pytest.raises(ValueError):
        GapStats([0], decay=0.0)


def test_before_warmup_it_is_exact_lru() -> None:
    for name in ("lru", "reuse"):
        cache = PrefixCache(4, page_size=1, policy=name)
        put(cache, [1, 2])
        put(cache, [1, 2, 3])
        put(cache, [7])
        put(cache, [8])  # full: evicts the least recently used leaf, [3]
        assert [cached_len(cache, t) for t in ([1, 2, 3], [7], [8])] == [2, 1, 1], name


def learned_cache(trust: float) -> PrefixCache:
    """Gap model primed: continuation leaves at depth 2 come back after 3 ticks, root branches never."""
    policy = ReusePolicy(warmup=0, refresh=1, prior=0.0, trust=trust, step=0.0)
    for _ in range(20):
        policy.stats.add(leaf_class_of_continuation(), 3, True)
        policy.stats.add(0, 1000, False)
    cache = PrefixCache(5, page_size=1, policy=policy)
    put(cache, [9])  # clock 1-2, class 0
    put(cache, [8])  # clock 3-4
    assert cache.evict(1) == 1  # [9] goes (age 2); the first refit sets the keep times
    return cache


def leaf_class_of_continuation() -> int:
    return (1 * 7 + 1) * 6 + 0


def test_learned_keep_times_evict_the_branch_before_the_older_continuation() -> None:
    cache = learned_cache(trust=1.0)
    policy = cache.policy
    assert isinstance(policy, ReusePolicy)
    assert policy.keep[0] < 0.0 < policy.keep[leaf_class_of_continuation()]
    put(cache, [1, 2])  # clock 5-6
    put(cache, [1, 2, 3])  # clock 7-8: [3] is a continuation leaf
    put(cache, [7])  # clock 9-10: a new branch, the youngest leaf; the pool is full (5 pages)
    assert cache.evict(2) == 2
    # [8] and [7] (branch class, keep < 0) go before the older continuation [3]; LRU would drop [8], [3]
    assert [cached_len(cache, t) for t in ([1, 2, 3], [7], [8])] == [3, 0, 0]


def test_with_no_trust_the_same_requests_stay_lru() -> None:
    cache = learned_cache(trust=0.0)
    put(cache, [1, 2])
    put(cache, [1, 2, 3])
    put(cache, [7])
    assert cache.evict(2) == 2
    assert [cached_len(cache, t) for t in ([1, 2, 3], [7], [8])] == [2, 1, 0]


def test_ghost_record_and_tracked_leaves_are_bounded_by_the_pool() -> None:
    policy = ReusePolicy(warmup=0, refresh=4)
    cache = PrefixCache(6, page_size=1, policy=policy)
    rng = np.random.default_rng(0)
    for i in range(400):
        base = int(rng.integers(0, 4))
        put(cache, [base, 100 + i % 37, 200 + i])
        assert policy.num_ghost_pages <= 6
        assert policy.num_tracked <= 6
    assert policy.stats.observations > 300
    cache.flush()
    for i in range(3000):  # flushed leaves are forgotten once the map passes its bound
        put(cache, [5000 + i])
    assert policy.num_tracked <= 2 * 6 + 1024 + 1


def test_bad_parameters_and_registry() -> None:
    assert isinstance(make_policy("reuse"), ReusePolicy)
    for kwargs in ({"refresh": 0}, {"trust": 1.5}, {"smooth": 0.0}, {"loss_weight": -1.0}):
        with pytest.raises(ValueError):
            ReusePolicy(**kwargs)  # type: ignore[arg-type]


class ReuseCacheMachine(CacheMachine):
    """The reference-model machine of test_stateful with a reuse policy that learns from the first eviction."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = PrefixCache(12, page_size=2, policy=ReusePolicy(warmup=0, refresh=1, trust=1.0))


ReuseCacheMachine.TestCase.settings = CacheMachine.TestCase.settings
test_reuse_cache_against_reference_model = ReuseCacheMachine.TestCase
