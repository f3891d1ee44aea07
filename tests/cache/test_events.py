"""The CacheEvents hook sees exactly the stored and removed blocks, with stable chained hashes."""

from __future__ import annotations

import numpy as np

from cachemgr.cache import Namespace, PrefixCache

NS = Namespace("m")


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def blocks_stored(self, namespace, parent_block_hash, block_hashes, token_ids, page_size) -> None:  # type: ignore[no-untyped-def]
        self.events.append(
            ("stored", namespace, parent_block_hash, list(block_hashes), list(token_ids), page_size)
        )

    def blocks_removed(self, namespace, block_hashes) -> None:  # type: ignore[no-untyped-def]
        self.events.append(("removed", namespace, list(block_hashes)))

    def all_cleared(self) -> None:
        self.events.append(("cleared",))


def put(cache: PrefixCache, tokens: list[int], ns: Namespace = NS) -> None:
    lease = cache.open_lease(ns, tokens)
    pages = cache.allocate(lease.lease_id, len(tokens) // 2 - lease.matched_len // 2)
    assert pages is not None
    cache.commit(lease.lease_id, tokens, np.concatenate([lease.prefix_page_ids, pages]))
    cache.release(lease.lease_id)


def test_stored_removed_cleared_exactly() -> None:
    rec = Recorder()
    cache = PrefixCache(8, page_size=2, policy="lru", events=rec)
    put(cache, [1, 1, 2, 2])
    ((kind, ns, parent, (h1, h2), toks, ps),) = rec.events
    assert (kind, ns, parent, toks, ps) == ("stored", NS, None, [1, 1, 2, 2], 2)
    put(cache, [1, 1, 2, 2])  # full hit: nothing stored
    put(cache, [1, 1, 5, 5])  # splits [1 1 | 2 2], stores one block after h1
    (_, _, parent, (h5,), toks, _) = rec.events[1]
    assert (parent, toks, len(rec.events)) == (h1, [5, 5], 2)
    assert len({h1, h2, h5}) == 3 and all(0 <= h < 2**63 for h in (h1, h2, h5))
    rec.events.clear()
    assert cache.evict(1) == 1  # LRU: [2 2] was used before [5 5]
    assert rec.events == [("removed", NS, [h2])]
    rec.events.clear()
    assert cache.flush() == 2
    assert sorted(map(str, rec.events)) == sorted(
        map(str, [("removed", NS, [h5]), ("removed", NS, [h1]), ("cleared",)])
    )
    assert rec.events[-1] == ("cleared",)


def test_hashes_are_stable_and_namespaced() -> None:
    a, b, c = Recorder(), Recorder(), Recorder()
    put(PrefixCache(8, page_size=2, events=a), [1, 1, 2, 2])
    put(PrefixCache(8, page_size=2, events=b), [1, 1, 2, 2])
    put(PrefixCache(8, page_size=2, events=c), [1, 1, 2, 2], ns=Namespace("m", salt="x"))
    assert a.events == b.events
    assert a.events[0][3] != c.events[0][3]
    # A chained hash: the second block's hash depends on the first block's tokens.
    d = Recorder()
    put(PrefixCache(8, page_size=2, events=d), [3, 3, 2, 2])
    assert d.events[0][3][1] != a.events[0][3][1]
