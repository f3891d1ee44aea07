"""Unit tests of PrefixCache with tiny sizes: exact page ids, exact eviction order, every misuse path."""

from __future__ import annotations

import numpy as np
import pytest

from cachemgr.cache import IntegrityError, Namespace, PrefixCache

NS = Namespace("m")
PS = 2


def ids(arr: np.ndarray) -> list[int]:
    return [int(x) for x in arr]


def put(cache: PrefixCache, tokens: list[int], ns: Namespace = NS) -> list[int]:
    """Run one full request (match, lease, allocate, commit, release); returns the committed page ids."""
    lease = cache.open_lease(ns, tokens)
    aligned = tokens[: len(tokens) // cache.page_size * cache.page_size]
    need = len(aligned) // cache.page_size - lease.matched_len // cache.page_size
    pages = cache.allocate(lease.lease_id, need)
    assert pages is not None
    result = cache.commit(lease.lease_id, aligned, np.concatenate([lease.prefix_page_ids, pages]))
    cache.release(lease.lease_id)
    cache.check()
    return ids(result.page_ids)


def test_match_lease_commit_exact_ids() -> None:
    cache = PrefixCache(8, page_size=PS)
    m = cache.match(NS, [1, 2, 3, 4, 5])
    assert (m.matched_len, ids(m.page_ids), m.pending_len, m.pending_lease_id) == (0, [], 0, None)
    lease = cache.open_lease(NS, [1, 2, 3, 4, 5], m)
    assert (lease.lease_id, lease.matched_len, ids(lease.prefix_page_ids)) == (1, 0, [])
    pages = cache.allocate(lease.lease_id, 2)
    assert pages is not None and ids(pages) == [0, 1]
    assert ids(cache.lease_owned_pages(lease.lease_id)) == [0, 1]
    result = cache.commit(lease.lease_id, [1, 2, 3, 4], pages)
    assert (ids(result.page_ids), result.num_new_pages, result.num_duplicate_pages) == ([0, 1], 2, 0)
    assert ids(cache.lease_owned_pages(lease.lease_id)) == []
    s = cache.stats()
    assert (s.free, s.cached, s.leased, s.locked, s.num_nodes, s.num_leases) == (6, 2, 0, 2, 1, 1)
    cache.release(lease.lease_id)
    assert not cache.has_lease(lease.lease_id)
    m = cache.match(NS, [1, 2, 3, 9, 9])
    assert (m.matched_len, ids(m.page_ids)) == (2, [0])
    s = cache.stats()
    assert (s.locked, s.tokens_queried, s.tokens_hit) == (0, 10, 2)
    cache.check()


def test_only_full_pages_match_and_partial_node_split() -> None:
    cache = PrefixCache(8, page_size=PS)
    assert put(cache, [1, 2, 3, 4, 5, 6]) == [0, 1, 2]
    assert ids(cache.match(NS, [1, 2, 3, 4, 5]).page_ids) == [0, 1]
    assert put(cache, [1, 2, 3, 4, 7, 8]) == [0, 1, 3]
    assert cache.stats().num_nodes == 3  # [1 2 3 4] split off, two leaves below it
    assert ids(cache.match(NS, [1, 2, 3, 4, 7, 8, 9]).page_ids) == [0, 1, 3]


def test_lru_eviction_order_tail_first() -> None:
    cache = PrefixCache(6, page_size=PS, policy="lru")
    assert put(cache, [1, 1, 2, 2]) == [0, 1]  # A
    assert put(cache, [3, 3, 4, 4]) == [2, 3]  # B
    assert put(cache, [5, 5, 6, 6]) == [4, 5]  # C
    cache.match(NS, [1, 1])  # match alone does not refresh recency
    lease = cache.open_lease(NS, [1, 1, 2, 2])  # A used: now most recent
    cache.release(lease.lease_id)
    assert cache.evict(1) == 1  # B's tail page first
    assert ids(cache.match(NS, [3, 3, 4, 4]).page_ids) == [2]
    assert cache.evict(2) == 2  # rest of B, then C's tail
    assert cache.match(NS, [3, 3]).matched_len == 0
    assert ids(cache.match(NS, [5, 5, 6, 6]).page_ids) == [4]
    assert cache.stats().evictions == 3
    lease = cache.open_lease(NS, [9, 9])
    # evicts C's head; the free list is LIFO, so the most recently freed page comes first
    assert ids(cache.allocate(lease.lease_id, 4)) == [4, 5, 2, 3]
    assert ids(cache.match(NS, [1, 1, 2, 2]).page_ids) == [0, 1]
    cache.check()


def test_lfru_keeps_a_frequently_used_prefix_over_a_newer_one_used_once() -> None:
    cache = PrefixCache(8, page_size=PS, policy="lfru")
    assert cache.stats().policy == "lfru"
    put(cache, [9, 9])  # clock 1-2
    put(cache, [1, 1])  # A: clock 3-4
    for _ in range(5):  # A used five more times: clock 5-9
        cache.release(cache.open_lease(NS, [1, 1]).lease_id)
    put(cache, [2, 2])  # B: clock 10-11
    assert cache.evict(1) == 1  # no eviction horizon yet: plain LRU takes [9 9], idle 9 ticks
    cache.release(cache.open_lease(NS, [1, 1]).lease_id)  # A at 12 + 0.25 * 9 * log2(7) = 18.3
    put(cache, [3, 3])  # C: 14
    assert cache.evict(2) == 2  # B (11) then C (14); LRU would have taken A (12) before C
    assert [cache.match(NS, t).matched_len for t in ([1, 1], [2, 2], [3, 3])] == [2, 0, 0]
    cache.check()


def test_locked_and_pinned_pages_never_evicted() -> None:
    cache = PrefixCache(4, page_size=PS)
    put(cache, [1, 1, 2, 2])
    lease = cache.open_lease(NS, [1, 1, 2, 2, 3, 3])
    assert lease.matched_len == 4
    assert cache.evict(4) == 0
    other = cache.open_lease(NS, [7, 7])
    assert cache.allocate(other.lease_id, 3) is None
    assert ids(cache.allocate(other.lease_id, 2)) == [2, 3]
    cache.release(lease.lease_id)
    assert cache.pin(NS, [1, 1, 2, 2, 5]) == 4
    assert cache.stats().pinned == 2
    assert cache.evict(2) == 0
    assert cache.allocate(other.lease_id, 1) is None
    assert cache.flush() == 0
    assert cache.unpin(NS, [1, 1, 2, 2]) == 4
    assert cache.unpin(NS, [1, 1, 2, 2]) == 0
    assert cache.evict(1) == 1
    assert ids(cache.match(NS, [1, 1, 2, 2]).page_ids) == [0]
    cache.release(other.lease_id)
    cache.check()


def test_pin_inner_prefix_protects_only_it() -> None:
    cache = PrefixCache(4, page_size=PS)
    put(cache, [1, 1, 2, 2, 3, 3])
    assert cache.pin(NS, [1, 1]) == 2  # splits the node
    assert cache.evict(4) == 2
    assert ids(cache.match(NS, [1, 1, 2, 2]).page_ids) == [0]
    assert cache.stats().pinned == 1
    cache.check()


def test_namespace_isolation() -> None:
    cache = PrefixCache(8, page_size=PS)
    salted = Namespace("m", salt="tenant-a")
    put(cache, [1, 1, 2, 2])
    assert cache.match(salted, [1, 1, 2, 2]).matched_len == 0
    assert cache.match(Namespace("other"), [1, 1, 2, 2]).matched_len == 0
    assert put(cache, [1, 1, 2, 2], ns=salted) == [2, 3]
    assert ids(cache.match(NS, [1, 1, 2, 2]).page_ids) == [0, 1]
    assert ids(cache.match(salted, [1, 1, 2, 2]).page_ids) == [2, 3]


def test_duplicate_commit_frees_duplicates() -> None:
    cache = PrefixCache(8, page_size=PS)
    first = cache.open_lease(NS, [1, 1, 2, 2])
    second = cache.open_lease(NS, [1, 1, 2, 2])
    p1 = cache.allocate(first.lease_id, 2)
    p2 = cache.allocate(second.lease_id, 2)
    assert p1 is not None and p2 is not None and ids(p2) == [2, 3]
    cache.commit(first.lease_id, [1, 1, 2, 2], p1)
    result = cache.commit(second.lease_id, [1, 1, 2, 2], p2)
    assert (ids(result.page_ids), result.num_new_pages, result.num_duplicate_pages) == ([0, 1], 0, 2)
    s = cache.stats()
    assert (s.free, s.cached, s.leased, s.locked) == (6, 2, 0, 2)
    cache.release(first.lease_id)
    assert cache.evict(2) == 0  # still locked by the second lease
    cache.release(second.lease_id)
    assert cache.evict(2) == 2
    cache.check()


def test_commit_extends_lease_path_and_later_commit_grows_it() -> None:
    cache = PrefixCache(8, page_size=PS)
    put(cache, [1, 1])
    lease = cache.open_lease(NS, [1, 1, 2, 2])
    pages = cache.allocate(lease.lease_id, 2)
    assert pages is not None
    r = cache.commit(lease.lease_id, [1, 1, 2, 2], [0, int(pages[0])])
    assert (ids(r.page_ids), r.num_new_pages) == ([0, 1], 1)
    r = cache.commit(lease.lease_id, [1, 1, 2, 2, 3, 3], [0, 1, int(pages[1])])  # decode finished
    assert (ids(r.page_ids), r.num_new_pages) == ([0, 1, 2], 1)
    assert cache.stats().locked == 3
    cache.release(lease.lease_id)
    assert cache.stats().locked == 0
    cache.check()


def test_pending_prefix_reported_until_commit() -> None:
    cache = PrefixCache(8, page_size=PS)
    put(cache, [1, 1])
    lease = cache.open_lease(NS, [1, 1, 2, 2, 3, 3, 4])
    m = cache.match(NS, [1, 1, 2, 2, 5, 5])
    assert (m.matched_len, m.pending_len, m.pending_lease_id) == (2, 4, lease.lease_id)
    m = cache.match(NS, [1, 1, 2, 2, 3, 3, 4, 4])
    assert (m.matched_len, m.pending_len) == (2, 6)
    pages = cache.allocate(lease.lease_id, 2)
    assert pages is not None
    cache.commit(lease.lease_id, [1, 1, 2, 2], [0, int(pages[0])])
    m = cache.match(NS, [1, 1, 2, 2, 3, 3])
    assert (m.matched_len, m.pending_len, m.pending_lease_id) == (4, 6, lease.lease_id)
    cache.release(lease.lease_id)
    m = cache.match(NS, [1, 1, 2, 2, 3, 3])
    assert (m.matched_len, m.pending_len, m.pending_lease_id) == (4, 4, None)
    cache.check()


def test_stale_match_is_rematched() -> None:
    cache = PrefixCache(4, page_size=PS)
    put(cache, [1, 1, 2, 2])
    m = cache.match(NS, [1, 1, 2, 2])
    assert cache.evict(1) == 1
    lease = cache.open_lease(NS, [1, 1, 2, 2], m)
    assert (lease.matched_len, ids(lease.prefix_page_ids)) == (2, [0])
    cache.release(lease.lease_id)
    cache.check()


def test_flush_keeps_locked_and_reports() -> None:
    cache = PrefixCache(8, page_size=PS)
    put(cache, [1, 1, 2, 2])
    put(cache, [3, 3])
    lease = cache.open_lease(NS, [1, 1])
    assert cache.flush() == 2  # [2 2] and [3 3]; [1 1] is locked
    assert ids(cache.match(NS, [1, 1, 2, 2]).page_ids) == [0]
    cache.release(lease.lease_id)
    assert cache.flush() == 1
    s = cache.stats()
    assert (s.free, s.cached, s.num_nodes, s.evictions) == (8, 0, 0, 0)
    cache.check()


def test_dump_is_bounded() -> None:
    cache = PrefixCache(16, page_size=PS)
    for t in range(5):
        put(cache, [t, t, 9, 9])
    d = cache.dump(max_nodes=3)
    assert (d.num_nodes_shown, d.num_nodes_total, d.truncated) == (3, 5, True)
    ns = d.namespaces[0]
    assert (ns.model, ns.num_pages, len(ns.children), ns.num_hidden_children) == ("m", 10, 3, 2)
    assert ns.children[0].token_preview == (4, 4, 9, 9)


def _snapshot(cache: PrefixCache) -> tuple[object, ...]:
    return (cache.stats(), cache.dump())


BAD_CALLS = [
    ("unknown lease allocate", lambda c, lid, own: c.allocate(999, 1)),
    ("unknown lease release", lambda c, lid, own: c.release(999)),
    ("unknown lease commit", lambda c, lid, own: c.commit(999, [1, 1], [own[0]])),
    ("string lease", lambda c, lid, own: c.release("1")),
    ("negative allocate", lambda c, lid, own: c.allocate(lid, -1)),
    ("float allocate", lambda c, lid, own: c.allocate(lid, 1.0)),
    ("negative evict", lambda c, lid, own: c.evict(-2)),
    ("negative dump", lambda c, lid, own: c.dump(-1)),
    ("page not owned", lambda c, lid, own: c.commit(lid, [1, 1, 2, 2, 3, 3], [0, 1, 7])),
    ("page twice", lambda c, lid, own: c.commit(lid, [1, 1, 2, 2, 3, 3, 4, 4], [0, 1, own[0], own[0]])),
    ("tree page at wrong position", lambda c, lid, own: c.commit(lid, [1, 1, 2, 2, 3, 3], [0, 0, own[0]])),
    ("page id out of range", lambda c, lid, own: c.commit(lid, [1, 1, 2, 2, 3, 3], [0, 1, 99])),
    ("too few pages", lambda c, lid, own: c.commit(lid, [1, 1, 2, 2, 3, 3], [0, 1])),
    ("partial page", lambda c, lid, own: c.commit(lid, [1, 1, 2, 2, 3], [0, 1, own[0]])),
    ("other tokens", lambda c, lid, own: c.commit(lid, [1, 1, 5, 5, 3, 3], [0, 1, own[0]])),
    ("float tokens", lambda c, lid, own: c.match(NS, [1.0, 2.0])),
    ("float array", lambda c, lid, own: c.match(NS, np.array([1.5, 2.0]))),
    ("bool tokens", lambda c, lid, own: c.match(NS, [True, False])),
    ("string tokens", lambda c, lid, own: c.match(NS, "abc")),
    ("2d tokens", lambda c, lid, own: c.match(NS, np.zeros((2, 2), dtype=np.int32))),
    ("int64 out of range", lambda c, lid, own: c.open_lease(NS, np.array([2**40], dtype=np.int64))),
    ("list out of range", lambda c, lid, own: c.pin(NS, [2**31, 0])),
    ("bad namespace", lambda c, lid, own: c.match("m", [1, 1])),
    ("bad match", lambda c, lid, own: c.open_lease(NS, [1, 1], match=object())),
    ("bad policy", lambda c, lid, own: PrefixCache(4, policy="nope")),
    ("zero pages", lambda c, lid, own: PrefixCache(0)),
]


@pytest.mark.parametrize(("name", "call"), BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_calls_raise_and_change_nothing(name: str, call: object) -> None:
    cache = PrefixCache(8, page_size=PS)
    put(cache, [1, 1, 2, 2])
    lease = cache.open_lease(NS, [1, 1, 2, 2, 3, 3])
    owned = cache.allocate(lease.lease_id, 2)
    assert owned is not None
    own = ids(owned)
    before = _snapshot(cache)
    with pytest.raises(ValueError):
        call(cache, lease.lease_id, own)  # type: ignore[operator]
    assert _snapshot(cache) == before
    assert ids(cache.lease_owned_pages(lease.lease_id)) == own
    cache.check()


def test_check_raises_with_numbers_on_corruption() -> None:
    cache = PrefixCache(4, page_size=PS)
    put(cache, [1, 1])
    cache._alloc._free.append(0)  # a cached page also on the free list
    with pytest.raises(IntegrityError, match="two places"):
        cache.check()


def test_returned_ids_are_read_only() -> None:
    cache = PrefixCache(4, page_size=PS)
    put(cache, [1, 1, 2, 2])
    m = cache.match(NS, [1, 1, 2, 2])
    with pytest.raises(ValueError):
        m.page_ids[0] = 3
