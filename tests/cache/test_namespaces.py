"""Namespace roots do not accumulate: an idle namespace with nothing cached is forgotten."""

from __future__ import annotations

from cachemgr.cache import Namespace, PrefixCache
from cachemgr.cache.types import IntegrityError

PS = 4


def tokens(n: int, start: int = 1) -> list[int]:
    return list(range(start, start + n))


def test_ten_thousand_distinct_salts_leave_no_roots_once_idle() -> None:
    cache = PrefixCache(64, page_size=PS)
    for i in range(10_000):
        ns = Namespace("m", f"salt-{i}")
        cache.match(ns, tokens(10))
        lease = cache.open_lease(ns, tokens(10))
        if i % 2:  # half of them never get pages (a request that failed or was aborted before compute)
            pages = cache.allocate(lease.lease_id, 2)
            assert pages is not None
            cache.commit(lease.lease_id, tokens(8), pages)
        cache.release(lease.lease_id)
        assert cache.num_namespaces <= 64 // 2  # only namespaces holding cached pages remain
    cache.check()
    stats = cache.stats()
    # 32 namespaces still hold 2 cached pages each; every other root went away when released or evicted.
    assert (cache.num_namespaces, stats.cached, stats.num_nodes) == (32, 64, 32)
    assert cache.flush() == 64
    assert cache.num_namespaces == 0
    cache.check()


def test_root_stays_while_a_lease_holds_it_even_without_pages() -> None:
    cache = PrefixCache(8, page_size=PS)
    ns = Namespace("m", "a")
    first = cache.open_lease(ns, tokens(2))  # shorter than a page: locks nothing, registers no pending
    second = cache.open_lease(ns, tokens(6))  # registers one pending page at the root
    assert cache.num_namespaces == 1
    cache.release(first.lease_id)
    assert cache.num_namespaces == 1
    assert cache.match(ns, tokens(6)).pending_len == PS  # the second lease's pending page is still seen
    cache.release(second.lease_id)
    assert cache.num_namespaces == 0
    cache.check()


def test_evicting_a_namespaces_last_page_drops_its_root_but_not_a_pinned_one() -> None:
    cache = PrefixCache(4, page_size=PS)
    a, b, c = Namespace("m", "a"), Namespace("m", "b"), Namespace("m", "c")
    for ns in (a, b):
        lease = cache.open_lease(ns, tokens(8))
        cache.commit(lease.lease_id, tokens(8), cache.allocate(lease.lease_id, 2))
        cache.release(lease.lease_id)
    assert cache.pin(b, tokens(8)) == 8
    lease = cache.open_lease(c, tokens(8))
    assert cache.allocate(lease.lease_id, 2) is not None  # evicts all of a, none of pinned b
    assert cache.num_namespaces == 2  # b (pinned) and c (live lease)
    assert cache.match(a, tokens(8)).matched_len == 0
    cache.release(lease.lease_id)
    assert cache.num_namespaces == 1
    assert cache.flush() == 0  # pins survive a flush, and so does their namespace
    assert cache.num_namespaces == 1
    assert cache.unpin(b, tokens(8)) == 8
    assert (cache.flush(), cache.num_namespaces) == (2, 0)
    cache.check()


def test_check_reports_a_kept_idle_root() -> None:
    cache = PrefixCache(4, page_size=PS)
    ns = Namespace("m", "a")
    lease = cache.open_lease(ns, tokens(4))
    cache.check()
    root = cache._roots[ns]  # white-box: simulate the old leak to prove the check catches it
    cache.release(lease.lease_id)
    cache._roots[ns] = root
    try:
        cache.check()
    except IntegrityError as exc:
        assert str(exc) == f"root of {ns}: empty and idle but kept (namespaces must not accumulate)"
    else:
        raise AssertionError("check() accepted an idle empty root")
