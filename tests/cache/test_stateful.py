"""Randomised operations against a naive reference model: a dict of committed page prefixes.

The model knows exactly what is cached except which pages eviction picks; after any call that may evict
it learns the removals from the cache and asserts they were legal (unlocked, unpinned, whole subtrees,
as many pages as reported). ``check()`` runs after every step.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cachemgr.cache import Namespace, PrefixCache

PS = 2
NAMESPACES = [Namespace("m"), Namespace("m", salt="s")]
tokens_st = st.lists(st.integers(0, 2), min_size=0, max_size=9)
ns_st = st.sampled_from(NAMESPACES)

Key = tuple[Namespace, tuple[int, ...]]


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = PrefixCache(12, page_size=PS)
        self.cached: dict[Key, int] = {}  # (namespace, tokens up to a page end) -> page id
        self.leases: dict[int, tuple[Namespace, list[int]]] = {}  # id -> (ns, locked path tokens)
        self.owned: dict[int, set[int]] = {}
        self.pins: dict[Key, int] = {}

    # -- model helpers
    def longest(self, ns: Namespace, tokens: list[int]) -> list[int]:
        page_ids = []
        for end in range(PS, len(tokens) // PS * PS + 1, PS):
            page = self.cached.get((ns, tuple(tokens[:end])))
            if page is None:
                break
            page_ids.append(page)
        return page_ids

    def protected(self) -> set[Key]:
        keys: set[Key] = set()
        paths = [(ns, toks) for ns, toks in self.leases.values()]
        paths += [(ns, list(t)) for (ns, t), n in self.pins.items() if n > 0]
        for ns, toks in paths:
            for end in range(PS, len(toks) + 1, PS):
                keys.add((ns, tuple(toks[:end])))
        return keys

    def sync_removals(self, expected: int | None) -> None:
        """Drop model entries the cache no longer holds; assert the removals were legal."""
        gone = [
            key for key in self.cached if self.cache.match(key[0], list(key[1])).matched_len < len(key[1])
        ]
        assert not set(gone) & self.protected()
        for ns, toks in gone:  # a removed prefix takes every extension of it
            assert all((n, t) in gone for (n, t) in self.cached if n == ns and t[: len(toks)] == toks)
        for key in gone:
            del self.cached[key]
        if expected is not None:
            assert len(gone) == expected

    # -- rules
    @rule(ns=ns_st, tokens=tokens_st)
    def match(self, ns: Namespace, tokens: list[int]) -> None:
        m = self.cache.match(ns, tokens)
        expect = self.longest(ns, tokens)
        assert m.matched_len == PS * len(expect)
        assert m.page_ids.tolist() == expect
        assert m.pending_len >= m.matched_len

    @rule(ns=ns_st, tokens=tokens_st)
    def open_lease(self, ns: Namespace, tokens: list[int]) -> None:
        lease = self.cache.open_lease(ns, tokens)
        expect = self.longest(ns, tokens)
        assert lease.prefix_page_ids.tolist() == expect
        self.leases[lease.lease_id] = (ns, tokens[: PS * len(expect)])
        self.owned[lease.lease_id] = set()

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), num=st.integers(0, 6))
    def allocate(self, data: st.DataObject, num: int) -> None:
        lid = data.draw(st.sampled_from(sorted(self.leases)))
        before = self.cache.stats().free
        pages = self.cache.allocate(lid, num)
        self.sync_removals(None)
        if pages is None:
            assert self.cache.stats().free < num
            return
        got = set(pages.tolist())
        assert len(got) == num and not got & set(self.cached.values())
        assert all(not got & o for o in self.owned.values())
        assert before <= self.cache.stats().free + num
        self.owned[lid] |= got

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), max_size=6))
    def commit(self, data: st.DataObject, extra: list[int]) -> None:
        lid = data.draw(st.sampled_from(sorted(self.leases)))
        ns, path = self.leases[lid]
        tokens = path + extra[: len(extra) // PS * PS]
        num_new = (len(tokens) - len(path)) // PS
        owned = sorted(self.owned[lid])
        if len(owned) < num_new:
            return
        reuse = data.draw(st.booleans())  # resend the tree's pages, or (wastefully) own pages for them too
        path_ids = self.longest(ns, path)
        if not reuse and len(owned) >= num_new + len(path_ids):
            page_ids = owned[: len(path_ids) + num_new]
        else:
            page_ids = path_ids + owned[:num_new]
        expect = []
        dups = new = 0
        for i, page in enumerate(page_ids):
            key = (ns, tuple(tokens[: PS * (i + 1)]))
            if key in self.cached:
                expect.append(self.cached[key])
                dups += page != self.cached[key]
            else:
                expect.append(page)
                self.cached[key] = page
                new += 1
        result = self.cache.commit(lid, tokens, page_ids)
        assert result.page_ids.tolist() == expect
        assert (result.num_duplicate_pages, result.num_new_pages) == (dups, new)
        self.owned[lid] -= set(page_ids)
        self.leases[lid] = (ns, tokens)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lid = data.draw(st.sampled_from(sorted(self.leases)))
        self.cache.release(lid)
        del self.leases[lid], self.owned[lid]
        assert not self.cache.has_lease(lid)

    @rule(num=st.integers(0, 5))
    def evict(self, num: int) -> None:
        evicted = self.cache.evict(num)
        self.sync_removals(evicted)

    @rule(ns=ns_st, tokens=tokens_st)
    def pin(self, ns: Namespace, tokens: list[int]) -> None:
        pinned = self.cache.pin(ns, tokens)
        assert pinned == PS * len(self.longest(ns, tokens))
        if pinned:
            key = (ns, tuple(tokens[:pinned]))
            self.pins[key] = self.pins.get(key, 0) + 1

    @rule(ns=ns_st, tokens=tokens_st)
    def unpin(self, ns: Namespace, tokens: list[int]) -> None:
        unpinned = self.cache.unpin(ns, tokens)
        key = (ns, tuple(tokens[: PS * len(self.longest(ns, tokens))]))
        if self.pins.get(key, 0) > 0:
            assert unpinned == len(key[1])
            self.pins[key] -= 1
        else:
            assert unpinned == 0

    @rule()
    def flush(self) -> None:
        freed = self.cache.flush()
        self.sync_removals(freed)
        protected = self.protected()
        assert all(key in protected for key in self.cached)

    @invariant()
    def consistent(self) -> None:
        self.cache.check()
        s = self.cache.stats()
        assert s.cached == len(self.cached)
        assert s.leased == sum(len(o) for o in self.owned.values())
        assert s.free + s.cached + s.leased == s.num_pages
        assert s.num_leases == len(self.leases)
        for lid, pages in self.owned.items():
            assert set(self.cache.lease_owned_pages(lid).tolist()) == pages
        assert np.all(np.isin(list(self.cached.values()), np.arange(12)))


CacheMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
test_cache_against_reference_model = CacheMachine.TestCase
