"""The shadow LRU: at full sampling it hits exactly what the real tree under LRU hits; sampled, it keeps
the rate and the capacity it was given."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cachemgr.cache import Namespace, PrefixCache
from cachemgr.cache.hashing import namespace_seed
from cachemgr.cache.shadow import ShadowLRU

NS = Namespace("m", "s")


def _prompts(seed: int, count: int) -> list[list[int]]:
    """Conversations that come back and grow, over a few shared system prompts (page size 2)."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1000) for _ in range(6)] for _ in range(3)]
    live: list[list[int]] = []
    out = []
    for _ in range(count):
        if live and rng.random() < 0.6:
            conv = rng.choice(live)
            conv += [rng.randrange(1000) for _ in range(2 * rng.randint(1, 3))]
        else:
            conv = [*rng.choice(systems), *(rng.randrange(1000) for _ in range(2 * rng.randint(1, 4)))]
            live.append(conv)
        out.append(list(conv))
    return out


@pytest.mark.parametrize("capacity", [8, 24, 64])
def test_full_sampling_hits_what_the_lru_tree_hits(capacity: int) -> None:
    cache = PrefixCache(capacity, page_size=2, policy="lru")
    shadow = ShadowLRU(capacity, page_size=2, target_pages=capacity)
    assert shadow.rate == 1.0 and shadow.capacity == capacity
    seed = namespace_seed(NS.model, NS.salt)
    for tokens in _prompts(capacity, 400):
        full = tokens[: len(tokens) // 2 * 2]
        if len(full) // 2 > capacity:
            continue  # a prompt larger than the pool cannot be held by either
        lease = cache.open_lease(NS, full)
        _, lru_hits, our_hits = shadow.access(seed, np.asarray(full, np.int32), lease.matched_len // 2)
        assert lru_hits == our_hits == lease.matched_len // 2
        pages = cache.allocate(lease.lease_id, (len(full) - lease.matched_len) // 2)
        assert pages is not None
        cache.commit(lease.lease_id, full, np.concatenate([lease.prefix_page_ids, pages]))
        cache.release(lease.lease_id)
    assert len(shadow) <= capacity


def test_sampling_keeps_its_rate_and_capacity() -> None:
    shadow = ShadowLRU(100_000, page_size=16, target_pages=4096)
    assert shadow.rate == pytest.approx(4096 / 100_000) and shadow.capacity == 4096
    tokens = np.arange(16 * 20_000, dtype=np.int32)
    sampled, lru_hits, our_hits = shadow.access(1, tokens, matched_pages=10_000)
    assert abs(sampled / 20_000 - shadow.rate) < 0.006
    assert lru_hits == 0 and 0 < our_hits < sampled  # pages of the first half count as the cache's hits
    assert len(shadow) == min(sampled, shadow.capacity)
    big = ShadowLRU(10**7, page_size=16)  # the rate never falls below 1/64
    assert big.rate == 1 / 64 and big.capacity == 156_250


def test_sampled_results_are_pinned() -> None:
    """Exact figures of a sampled run, so that a faster shadow can show it decides bit for bit the same.
    Page size 1 keeps them independent of how the BLAS library sums a page's tokens."""
    shadow = ShadowLRU(400, page_size=1, target_pages=40)
    assert shadow.rate == 0.1 and shadow.capacity == 40
    prompts = [np.asarray(tokens, np.int32) for tokens in _prompts(5, 2000)]
    results = [shadow.access(7, tokens, len(tokens) // 2) for tokens in prompts]
    assert results[:6] == [(1, 0, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1), (2, 0, 1)]
    assert np.sum(results, axis=0).tolist() == [4151, 2202, 2507]
    assert len(shadow) == 40


def test_bad_sizes_raise() -> None:
    for args in ((0, 16), (16, 0), (16, 16, 0)):
        with pytest.raises(ValueError):
            ShadowLRU(*args)
