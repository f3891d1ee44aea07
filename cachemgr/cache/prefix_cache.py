"""PrefixCache: the radix tree over KV pages, with leases, pending prefixes, pins and eviction.

Every page is in exactly one state::

    free  --allocate-->  owned by a lease  --commit-->  cached in the tree  --evict/flush-->  free
                              |                              ^
                              +--release (never committed)---+--> free      (duplicates of tree pages too)

A request's lifetime: ``match`` (read-only) -> ``open_lease`` (locks the matched path, registers the rest
of the prompt as pending) -> ``allocate`` (may evict) -> ``commit`` (pages become shareable, stay locked)
-> ``release``. Single-threaded: call it from one thread only. Every public method either raises
ValueError for caller misuse before changing anything, or completes.

The class holds all state and the request path; the steps it delegates live beside it: matching.py
(read-only walks), commit_plan.py (commit's checks and dedup), path_locks.py (lock counts),
tree_edits.py (every node insert, split, trim and removal), reclaim.py (evict, flush), pins.py, and
integrity.py (check, dump).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cachemgr.cache.allocator import PageAllocator
from cachemgr.cache.commit_plan import plan_commit
from cachemgr.cache.events import CacheEvents
from cachemgr.cache.evictor import EvictionHeap, is_evictable
from cachemgr.cache.hashing import PageHasher, namespace_seed
from cachemgr.cache.integrity import check_cache, dump_tree
from cachemgr.cache.lease_state import LeaseState
from cachemgr.cache.matching import EMPTY_PAGE_IDS, MatchHandle, Tokens, pending_below, walk
from cachemgr.cache.node import TreeNode
from cachemgr.cache.path_locks import lock_extension, lock_path, unlock_path
from cachemgr.cache.pins import num_pinned_pages, pin_prefix, unpin_prefix
from cachemgr.cache.policy import DEFAULT_POLICY, EvictionPolicy, make_policy
from cachemgr.cache.reclaim import evict_pages, flush_tree
from cachemgr.cache.tree_edits import drop_root_if_idle, insert_leaf, split_node
from cachemgr.cache.types import CacheStats, CommitResult, Lease, MatchResult, Namespace, TreeDump
from cachemgr.cache.validate import as_int32_ids, check_count, check_namespace


class PrefixCache:
    """Shared-prefix KV page cache. See the module docstring for the page states and request flow."""

    def __init__(self, num_pages: int, page_size: int = 16, policy: str | EvictionPolicy = DEFAULT_POLICY,
                 events: CacheEvents | None = None) -> None:  # fmt: skip
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages must be a positive integer, got {num_pages!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._page_bytes = 4 * page_size
        # An instance is for tools (the offline optimum in bench.replay needs to see the future).
        self.policy = policy if isinstance(policy, EvictionPolicy) else make_policy(policy)
        self._events = events
        self._hasher = PageHasher(page_size) if events is not None else None
        # A hook the policy leaves at the base class's no-op is skipped on the eviction path.
        overridden = type(self.policy).on_evict is not EvictionPolicy.on_evict
        self._evict_hook = self.policy.on_evict if overridden else None
        overridden = type(self.policy).on_evict_tail is not EvictionPolicy.on_evict_tail
        self._evict_tail_hook = self.policy.on_evict_tail if overridden else None
        overridden = type(self.policy).on_miss is not EvictionPolicy.on_miss
        self._miss_hook = self.policy.on_miss if overridden else None
        overridden = type(self.policy).on_lease is not EvictionPolicy.on_lease
        self._lease_hook = self.policy.on_lease if overridden else None
        self.policy.attach(num_pages, page_size)
        self._alloc = PageAllocator(num_pages)
        self._roots: dict[Namespace, TreeNode] = {}
        self._leases: dict[int, LeaseState] = {}
        self._heap = EvictionHeap()
        self._pinned: set[TreeNode] = set()
        self._next_lease_id = 1
        self._clock = 0
        self._epoch = 0  # bumped whenever nodes are added, split, trimmed or removed
        self._num_nodes = 0
        self._cached_pages = 0
        self._leased_pages = 0
        self._locked_pages = 0
        self._tokens_queried = 0
        self._tokens_hit = 0
        self._evictions = 0

    # ----------------------------------------------------------------- matching

    def match(self, namespace: Namespace, tokens: Tokens) -> MatchResult:
        """Longest committed page-aligned prefix of ``tokens`` and the longest prefix a live lease is
        computing.

        Changes no tree state (recency is updated when a lease locks the path); counts queried/hit tokens.
        """
        check_namespace(namespace)
        arr = as_int32_ids(tokens, "tokens")
        num_full = len(arr) // self.page_size
        tb = arr[: num_full * self.page_size].tobytes()
        self._tokens_queried += len(arr)
        root = self._roots.get(namespace)
        if root is None:
            handle = MatchHandle(self._epoch, namespace, tb, [], None, 0)
            return MatchResult(0, EMPTY_PAGE_IDS, 0, None, handle)
        path, partial, partial_pages = walk(root, tb, 0, self._page_bytes, self.page_size)
        end = path[-1] if path else root
        matched_pages = end.end_pages + partial_pages
        parts = [node.page_ids for node in path]
        if partial is not None:
            parts.append(partial.page_ids[:partial_pages])
        page_ids = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else EMPTY_PAGE_IDS)
        pending_pages, pending_id = pending_below(end, tb, matched_pages, self._page_bytes, self.page_size)
        self._tokens_hit += matched_pages * self.page_size
        handle = MatchHandle(self._epoch, namespace, tb, path, partial, partial_pages)
        return MatchResult(
            matched_pages * self.page_size, page_ids, pending_pages * self.page_size, pending_id, handle
        )

    # ------------------------------------------------------------------ leases

    def open_lease(self, namespace: Namespace, tokens: Tokens, match: MatchResult | None = None) -> Lease:
        """Lock the longest committed prefix of ``tokens`` (re-matching unless ``match`` is still current).

        Registers the prompt's full pages beyond the match as pending for this lease, so that ``match`` of
        other requests reports them until this lease commits or releases.
        """
        check_namespace(namespace)
        arr = as_int32_ids(tokens, "tokens")
        if match is not None and not isinstance(match, MatchResult):
            raise ValueError("match must be a MatchResult from this cache or None")
        num_full = len(arr) // self.page_size
        tb = arr[: num_full * self.page_size].tobytes()
        handle = match.handle if match is not None else None
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = TreeNode(namespace, None, b"", EMPTY_PAGE_IDS, 0, b"")
            if self._hasher is not None:
                root.prefix_hashes = np.array([namespace_seed(namespace.model, namespace.salt)], np.uint64)
        root.lock_count += 1  # a root's lock count is its namespace's number of live leases
        if (isinstance(handle, MatchHandle) and handle.epoch == self._epoch
                and handle.namespace == namespace and handle.token_bytes == tb):  # fmt: skip
            path, partial, partial_pages = list(handle.path), handle.partial, handle.partial_pages
            prefix_ids = match.page_ids  # a split below does not change the ids
        else:
            path, partial, partial_pages = walk(root, tb, 0, self._page_bytes, self.page_size)
            prefix_ids = None
        if partial is not None:
            path.append(split_node(self, partial, partial_pages))
        self._clock += 1
        now = self._clock
        self._locked_pages += lock_path(path, now)
        self.policy.on_use(path, now)
        end = path[-1] if path else root
        if self._miss_hook is not None and num_full > end.end_pages:
            self._miss_hook(end, tb)
        if self._lease_hook is not None:
            self._lease_hook(end, tb)
        if prefix_ids is None:
            prefix_ids = np.concatenate([n.page_ids for n in path]) if path else EMPTY_PAGE_IDS
        lease_id = self._next_lease_id
        self._next_lease_id += 1
        state = LeaseState(lease_id, namespace, end, tb, prefix_ids, self._page_bytes)
        self._leases[lease_id] = state
        if num_full > end.end_pages:
            state.register_pending(end, num_full)
        return Lease(lease_id, end.end_pages * self.page_size, prefix_ids)

    def _lease(self, lease_id: object) -> LeaseState:
        state = self._leases.get(lease_id) if isinstance(lease_id, int) else None
        if state is None:
            raise ValueError(f"unknown lease {lease_id!r}")
        return state

    def has_lease(self, lease_id: int) -> bool:
        return lease_id in self._leases

    def lease_owned_pages(self, lease_id: int) -> np.ndarray:
        """Pages allocated to the lease and not committed yet (sorted)."""
        return np.array(sorted(self._lease(lease_id).owned), dtype=np.int32)

    def allocate(self, lease_id: int, num_pages: int) -> np.ndarray | None:
        """Give the lease ``num_pages`` free pages, evicting by policy when short; None when there is no room.

        Never touches locked or pinned pages. On None nothing is allocated (eviction may have happened).
        """
        state = self._lease(lease_id)
        num_pages = check_count(num_pages, "num_pages")
        short = num_pages - self._alloc.num_free
        if short > 0:
            evict_pages(self, short)
        pages = self._alloc.take(num_pages)
        if pages is None:
            return None
        state.owned.update(pages.tolist())
        self._leased_pages += num_pages
        return pages

    def cancel_pending(self, lease_id: int) -> None:
        """Stop reporting the lease's pending prefix (its request moved elsewhere); locks and pages stay.
        Raises ValueError for an unknown lease."""
        self._lease(lease_id).unregister_pending()

    def release(self, lease_id: int) -> None:
        """Unlock the lease's path, free its uncommitted pages, drop its pending registration."""
        state = self._lease(lease_id)
        del self._leases[lease_id]
        end = state.node
        root, num_unlocked = unlock_path(end)
        self._locked_pages -= num_unlocked
        if end.lock_count == 0 and is_evictable(end):  # only the deepest node of a path can be a leaf
            self._heap.push(end, self.policy.priority(end))
        if state.owned:
            owned = list(state.owned)
            self._alloc.give_back(owned)
            self._leased_pages -= len(owned)
        state.unregister_pending()
        root.lock_count -= 1  # a root counts its namespace's live leases
        drop_root_if_idle(self, root)
        self._heap.compact(self._num_nodes)

    # ----------------------------------------------------------------- commit

    def commit(self, lease_id: int, tokens: Tokens, page_ids: Sequence[int] | np.ndarray) -> CommitResult:
        """Insert the full pages of ``tokens`` (from position 0) backed by ``page_ids``; keep them locked.

        ``page_ids[i]`` must be the page already backing position i in the tree (on the lease's path) or a
        page the lease owns. Where the tree already holds the tokens, its pages win and the lease's
        duplicates are freed. The lease's pending registration is cleared up to what was committed.
        """
        state = self._lease(lease_id)
        arr = as_int32_ids(tokens, "tokens")
        pids = as_int32_ids(page_ids, "page_ids")
        tb = arr.tobytes()
        extra, partial, partial_pages, tree_ids, dups, handed_over = plan_commit(
            state, tb, pids, self.page_size, self._page_bytes
        )
        # -- validated: mutate from here on
        num = len(pids)
        locked = state.locked_pages
        k = len(tree_ids)
        owned = state.owned
        if len(handed_over) == len(owned):  # the usual case: the lease hands over everything it owns
            owned.clear()
        else:
            owned -= handed_over
        self._leased_pages -= len(handed_over)
        if dups:
            self._alloc.give_back(dups)
            result = np.concatenate([tree_ids, pids[k:]])
        else:
            result = pids.copy()
        result.flags.writeable = False  # nodes keep views of it
        if partial is not None:
            extra.append(split_node(self, partial, partial_pages))
        end = extra[-1] if extra else state.node
        self._clock += 1
        if num > k:
            end = insert_leaf(self, end, tb[k * self._page_bytes :], result[k:])
        if num > locked:
            self._locked_pages += lock_extension(end, state.node, self._clock)
            state.move_to(end, tb, result)
            state.pending_committed(num)
        return CommitResult(result, num - k, len(dups))

    # ---------------------------------------------------- pins, eviction, flush

    def pin(self, namespace: Namespace, tokens: Tokens) -> int:
        """Protect the committed prefix of ``tokens`` from eviction; returns the pinned length in tokens."""
        return pin_prefix(self, namespace, tokens)

    def unpin(self, namespace: Namespace, tokens: Tokens) -> int:
        """Undo one ``pin`` of the same prefix; returns the unpinned length (0 when it was not pinned)."""
        return unpin_prefix(self, namespace, tokens)

    def evict(self, num_pages: int) -> int:
        """Free at least ``num_pages`` cached pages if possible (unlocked, unpinned leaves, by policy).

        Returns how many were freed (fewer when nothing else is evictable).
        """
        return evict_pages(self, check_count(num_pages, "num_pages"))

    def flush(self) -> int:
        """Drop every node that is not locked, not pinned and has no such descendant; returns pages freed.

        Emits blocks_removed for what was dropped, then all_cleared when the tree ended up empty.
        Pins survive a flush (a pin is the admin's explicit "keep this"). Not counted as evictions.
        """
        return flush_tree(self)

    # ------------------------------------------------------------- inspection

    def stats(self) -> CacheStats:
        return CacheStats(
            num_pages=self.num_pages,
            page_size=self.page_size,
            free=self._alloc.num_free,
            cached=self._cached_pages,
            leased=self._leased_pages,
            locked=self._locked_pages,
            pinned=num_pinned_pages(self._pinned),
            tokens_queried=self._tokens_queried,
            tokens_hit=self._tokens_hit,
            evictions=self._evictions,
            num_leases=len(self._leases),
            num_nodes=self._num_nodes,
            policy=self.policy.name,
        )

    @property
    def num_namespaces(self) -> int:
        """Namespaces with a root now: those with cached pages or a live lease (idle empty ones are
        dropped)."""
        return len(self._roots)

    def dump(self, max_nodes: int = 200) -> TreeDump:
        """Bounded nested view of the tree (breadth-first, at most ``max_nodes`` nodes)."""
        return dump_tree(self._roots, check_count(max_nodes, "max_nodes"), self._num_nodes, self.page_size)

    def check(self) -> None:
        """Raise IntegrityError (with the numbers) if any invariant of the page states or locks is broken."""
        check_cache(self)
