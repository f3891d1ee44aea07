"""PrefixCache: the radix tree over KV pages, with leases, pending prefixes, pins and eviction.

Every page is in exactly one state::

    free  --allocate-->  owned by a lease  --commit-->  cached in the tree  --evict/flush-->  free
                              |                              ^
                              +--release (never committed)---+--> free      (duplicates of tree pages too)

A request's lifetime: ``match`` (read-only) -> ``open_lease`` (locks the matched path, registers the rest
of the prompt as pending) -> ``allocate`` (may evict) -> ``commit`` (pages become shareable, stay locked)
-> ``release``. Single-threaded: call it from one thread only. Every public method either raises
ValueError for caller misuse before changing anything, or completes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cachemgr.cache.allocator import PageAllocator
from cachemgr.cache.events import CacheEvents
from cachemgr.cache.evictor import EvictionHeap, is_evictable
from cachemgr.cache.hashing import PageHasher, block_hashes, namespace_seed
from cachemgr.cache.integrity import check_cache, dump_tree
from cachemgr.cache.lease_state import LeaseState
from cachemgr.cache.node import TreeNode, common_pages
from cachemgr.cache.policy import DEFAULT_POLICY, EvictionPolicy, make_policy
from cachemgr.cache.types import CacheStats, CommitResult, Lease, MatchResult, Namespace, TreeDump
from cachemgr.cache.validate import as_int32_ids, check_count, check_namespace

_EMPTY = np.empty(0, dtype=np.int32)
_EMPTY.flags.writeable = False
Tokens = Sequence[int] | np.ndarray


class _MatchHandle:
    """What ``match`` found, reusable by ``open_lease`` while ``epoch`` (tree shape) is unchanged."""

    __slots__ = ("epoch", "namespace", "partial", "partial_pages", "path", "token_bytes")

    def __init__(self, epoch: int, namespace: Namespace, token_bytes: bytes, path: list[TreeNode],
                 partial: TreeNode | None, partial_pages: int) -> None:  # fmt: skip
        self.epoch = epoch
        self.namespace = namespace
        self.token_bytes = token_bytes
        self.path = path
        self.partial = partial
        self.partial_pages = partial_pages


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

    def _walk(self, node: TreeNode, tb: bytes, pos: int) -> tuple[list[TreeNode], TreeNode | None, int]:
        """Follow committed nodes along ``tb`` from byte ``pos`` below ``node``.

        Returns the fully matched nodes, and the node matched only in part with its matched page count.
        Tokens are always compared byte for byte, so the result is exact.
        """
        path: list[TreeNode] = []
        pb = self._page_bytes
        n = len(tb)
        children = node.children
        while pos < n:
            child = children.get(tb[pos : pos + pb])
            if child is None:
                break
            if tb.startswith(child.token_bytes, pos):  # compares in place, no slice copy
                path.append(child)
                children = child.children
                pos += len(child.token_bytes)
                continue
            end = pos + len(child.token_bytes)
            return path, child, common_pages(child.token_bytes, tb[pos:end], self.page_size)
        return path, None, 0

    def match(self, namespace: Namespace, tokens: Tokens) -> MatchResult:
        """Longest committed page-aligned prefix of ``tokens`` and the longest prefix a live lease is computing.

        Changes no tree state (recency is updated when a lease locks the path); counts queried/hit tokens.
        """
        check_namespace(namespace)
        arr = as_int32_ids(tokens, "tokens")
        num_full = len(arr) // self.page_size
        tb = arr[: num_full * self.page_size].tobytes()
        self._tokens_queried += len(arr)
        root = self._roots.get(namespace)
        if root is None:
            handle = _MatchHandle(self._epoch, namespace, tb, [], None, 0)
            return MatchResult(0, _EMPTY, 0, None, handle)
        path, partial, partial_pages = self._walk(root, tb, 0)
        end = path[-1] if path else root
        matched_pages = end.end_pages + partial_pages
        parts = [node.page_ids for node in path]
        if partial is not None:
            parts.append(partial.page_ids[:partial_pages])
        page_ids = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else _EMPTY)
        pending_pages, pending_id = self._pending_below(end, tb, matched_pages)
        self._tokens_hit += matched_pages * self.page_size
        handle = _MatchHandle(self._epoch, namespace, tb, path, partial, partial_pages)
        return MatchResult(
            matched_pages * self.page_size, page_ids, pending_pages * self.page_size, pending_id, handle
        )

    def _pending_below(self, end: TreeNode, tb: bytes, matched_pages: int) -> tuple[int, int | None]:
        """Longest prefix of ``tb`` that a lease registered at ``end`` is computing (at least the match)."""
        best_pages, best_id = matched_pages, None
        if end.pending:
            start = end.end_pages * self._page_bytes
            for lease_id, state in end.pending.items():
                assert isinstance(state, LeaseState)
                limit = state.pending_end_pages * self._page_bytes
                pages = end.end_pages + common_pages(tb[start:limit], state.prompt_bytes[start:limit],
                                                     self.page_size)  # fmt: skip
                if pages > best_pages:
                    best_pages, best_id = pages, lease_id
        return best_pages, best_id

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
            root = self._roots[namespace] = TreeNode(namespace, None, b"", _EMPTY, 0, b"")
            if self._hasher is not None:
                root.prefix_hashes = np.array([namespace_seed(namespace.model, namespace.salt)], np.uint64)
        root.lock_count += 1  # a root's lock count is its namespace's number of live leases
        if (isinstance(handle, _MatchHandle) and handle.epoch == self._epoch
                and handle.namespace == namespace and handle.token_bytes == tb):  # fmt: skip
            path, partial, partial_pages = list(handle.path), handle.partial, handle.partial_pages
            prefix_ids = match.page_ids  # a split below does not change the ids
        else:
            path, partial, partial_pages = self._walk(root, tb, 0)
            prefix_ids = None
        if partial is not None:
            path.append(self._split(partial, partial_pages))
        self._clock += 1
        now = self._clock
        for node in path:
            if node.lock_count == 0:
                self._locked_pages += node.num_pages
            node.lock_count += 1
            node.last_access = now
            node.hits += 1
        self.policy.on_use(path, now)
        end = path[-1] if path else root
        if self._miss_hook is not None and num_full > end.end_pages:
            self._miss_hook(end, tb)
        if self._lease_hook is not None:
            self._lease_hook(end, tb)
        if prefix_ids is None:
            prefix_ids = np.concatenate([n.page_ids for n in path]) if path else _EMPTY
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
            self._evict(short)
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
        node = state.node
        first = True
        while node.parent is not None:
            node.lock_count -= 1
            if node.lock_count == 0:
                self._locked_pages -= node.num_pages
                # Only the deepest node of a path can be a leaf.
                if first and is_evictable(node):
                    self._heap.push(node, self.policy.priority(node))
            first = False
            node = node.parent
        if state.owned:
            owned = list(state.owned)
            self._alloc.give_back(owned)
            self._leased_pages -= len(owned)
        state.unregister_pending()
        node.lock_count -= 1  # ``node`` is the namespace root now
        self._drop_root_if_idle(node)
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
        if len(arr) % self.page_size:
            raise ValueError(f"commit needs whole pages: {len(arr)} tokens, page size {self.page_size}")
        num = len(arr) // self.page_size
        if len(pids) != num:
            raise ValueError(f"{len(pids)} page ids for {num} pages of tokens")
        tb = arr.tobytes()
        locked = state.locked_pages
        if num >= locked:
            same_prefix = tb.startswith(state.path_bytes)
        else:
            same_prefix = state.path_bytes.startswith(tb)
        if not same_prefix:
            raise ValueError("commit tokens differ from the prefix this lease locked")
        extra: list[TreeNode] = []
        partial, partial_pages = None, 0
        if num > locked:
            extra, partial, partial_pages = self._walk(state.node, tb, locked * self._page_bytes)
        tree_ids = state.path_page_ids[: min(num, locked)]
        if extra or partial is not None:
            tree_parts = [tree_ids] + [n.page_ids for n in extra]
            if partial is not None:
                tree_parts.append(partial.page_ids[:partial_pages])
            tree_ids = np.concatenate(tree_parts)
        k = len(tree_ids)
        if pids.tobytes().startswith(tree_ids.tobytes()):  # the usual case: caller reused the tree's pages
            dups: list[int] = []
        else:
            head = pids[:k]
            dups = head[head != tree_ids].tolist()
        new_ids = pids[k:].tolist()
        mine = set(new_ids)
        mine.update(dups)
        owned = state.owned
        if len(mine) != len(new_ids) + len(dups) or not mine <= owned:
            raise ValueError("page ids must be owned by this lease (once each) or already back the prefix")
        # -- validated: mutate from here on
        if len(mine) == len(owned):  # the usual case: the lease hands over everything it owns
            owned.clear()
        else:
            owned -= mine
        self._leased_pages -= len(mine)
        if dups:
            self._alloc.give_back(dups)
            result = np.concatenate([tree_ids, pids[k:]])
        else:
            result = pids.copy()
        result.flags.writeable = False  # nodes keep views of it
        if partial is not None:
            extra.append(self._split(partial, partial_pages))
        end = extra[-1] if extra else state.node
        self._clock += 1
        if num > k:
            end = self._insert(end, tb[k * self._page_bytes :], result[k:])
        if num > locked:
            node = end
            while node is not state.node:
                node.lock_count += 1
                if node.lock_count == 1:
                    self._locked_pages += len(node.page_ids)
                node.last_access = self._clock
                node = node.parent
                assert node is not None
            state.move_to(end, tb, result)
            state.pending_committed(num)
        return CommitResult(result, num - k, len(dups))

    def _insert(self, parent: TreeNode, tb: bytes, page_ids: np.ndarray) -> TreeNode:
        """Add a leaf below ``parent`` (whose end is page-aligned with ``tb``'s start); emits blocks_stored."""
        depth = parent.depth_pages + len(parent.page_ids)
        node = TreeNode(parent.namespace, parent, tb, page_ids, depth, tb[: self._page_bytes])
        parent.children[node.key] = node
        node.last_access = self._clock
        self._num_nodes += 1
        self._cached_pages += len(page_ids)
        self._epoch += 1
        self.policy.on_insert(node, self._clock)
        if self._hasher is not None and self._events is not None:
            assert parent.prefix_hashes is not None
            seed = int(parent.prefix_hashes[-1])
            node.prefix_hashes = self._hasher.prefix_hashes(seed, np.frombuffer(tb, dtype=np.int32))
            node.block_hashes = block_hashes(node.prefix_hashes)
            parent_hash = parent.block_hashes[-1] if parent.block_hashes else None
            self._events.blocks_stored(node.namespace, parent_hash, list(node.block_hashes),
                                       np.frombuffer(tb, dtype=np.int32).tolist(), self.page_size)  # fmt: skip
        return node

    def _split(self, node: TreeNode, num_upper_pages: int) -> TreeNode:
        self._epoch += 1
        self._num_nodes += 1
        return node.split(num_upper_pages, self._page_bytes)

    # ----------------------------------------------------------- pins, eviction

    def pin(self, namespace: Namespace, tokens: Tokens) -> int:
        """Protect the committed prefix of ``tokens`` from eviction; returns the pinned length in tokens."""
        end = self._exact_end(namespace, tokens, split=True)
        if end is None:
            return 0
        end.pin_count += 1
        self._pinned.add(end)
        return end.end_pages * self.page_size

    def unpin(self, namespace: Namespace, tokens: Tokens) -> int:
        """Undo one ``pin`` of the same prefix; returns the unpinned length (0 when it was not pinned)."""
        end = self._exact_end(namespace, tokens, split=False)
        if end is None or end.pin_count == 0:
            return 0
        end.pin_count -= 1
        if end.pin_count == 0:
            self._pinned.discard(end)
            if is_evictable(end):
                self._heap.push(end, self.policy.priority(end))
        return end.end_pages * self.page_size

    def _exact_end(self, namespace: Namespace, tokens: Tokens, split: bool) -> TreeNode | None:
        check_namespace(namespace)
        arr = as_int32_ids(tokens, "tokens")
        root = self._roots.get(namespace)
        if root is None:
            return None
        tb = arr[: len(arr) // self.page_size * self.page_size].tobytes()
        path, partial, partial_pages = self._walk(root, tb, 0)
        if partial is not None:
            if not split:
                return None
            path.append(self._split(partial, partial_pages))
        return path[-1] if path else None

    def evict(self, num_pages: int) -> int:
        """Free at least ``num_pages`` cached pages if possible (unlocked, unpinned leaves, by policy).

        Returns how many were freed (fewer when nothing else is evictable).
        """
        return self._evict(check_count(num_pages, "num_pages"))

    def _evict(self, num_pages: int) -> int:
        heap = self._heap
        priority_of = self.policy.priority
        evict_hook = self._evict_hook
        evict_tail_hook = self._evict_tail_hook
        evicted = 0
        while evicted < num_pages:
            item = heap.pop()
            if item is None:
                break
            priority, node = item
            have = len(node.page_ids)
            keep = have - (num_pages - evicted) if have > num_pages - evicted else 0
            if evict_tail_hook is not None:
                evict_tail_hook(node, keep)
            self._trim(node, keep)
            if evict_hook is not None:
                evict_hook(node, priority)
            evicted += have - keep
            if keep:
                heap.push(node, priority_of(node))
            else:
                parent = node.parent
                assert parent is not None
                self._detach(node)
                if not parent.children and parent.lock_count == 0 and parent.pin_count == 0:
                    if parent.parent is not None:
                        heap.push(parent, priority_of(parent))  # it just became an evictable leaf
                    else:
                        self._drop_root_if_idle(parent)
        self._evictions += evicted
        return evicted

    def _trim(self, node: TreeNode, keep: int) -> None:
        """Drop the node's pages after the first ``keep`` (tail first: a prefix must stay a prefix)."""
        page_ids = node.page_ids
        gone = page_ids[keep:].tolist()
        node.page_ids = page_ids[:keep]
        node.token_bytes = node.token_bytes[: keep * self._page_bytes] if keep else b""
        self._alloc.give_back(gone)
        self._cached_pages -= len(gone)
        self._epoch += 1
        if node.block_hashes is not None and node.prefix_hashes is not None:
            removed = node.block_hashes[keep:]
            node.block_hashes = node.block_hashes[:keep]
            node.prefix_hashes = node.prefix_hashes[:keep]
            if self._events is not None and removed:
                self._events.blocks_removed(node.namespace, removed)

    def _drop_root_if_idle(self, root: TreeNode) -> None:
        """Forget a namespace whose root has no children and no live lease (hence no pins, locks or
        pending prefixes, which all hang below a child or on a lease).

        Without this, every distinct cache_salt ever seen would keep a root for good: a client sending a
        fresh salt per request would grow the daemon's memory without bound. A later request in the
        namespace simply creates a new root.
        """
        if root.children or root.lock_count:
            return
        assert root.parent is None and root.pending is None
        del self._roots[root.namespace]
        self._epoch += 1

    def _detach(self, node: TreeNode) -> None:
        parent = node.parent
        assert parent is not None and not node.children and node.num_pages == 0
        del parent.children[node.key]
        node.parent = None
        node.heap_seq = -1
        self._num_nodes -= 1

    def flush(self) -> int:
        """Drop every node that is not locked, not pinned and has no such descendant; returns pages freed.

        Emits blocks_removed for what was dropped, then all_cleared when the tree ended up empty.
        Pins survive a flush (a pin is the admin's explicit "keep this"). Not counted as evictions.
        """
        freed = 0
        for root in self._roots.values():
            order: list[TreeNode] = []
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                order.append(node)
                stack.extend(node.children.values())
            for node in reversed(order):  # children before parents
                if node.lock_count == 0 and node.pin_count == 0 and not node.children:
                    freed += node.num_pages
                    self._trim(node, 0)
                    self._detach(node)
        for root in list(self._roots.values()):
            self._drop_root_if_idle(root)
        if freed and self._cached_pages == 0 and self._events is not None:
            self._events.all_cleared()
        return freed

    # ------------------------------------------------------------- inspection

    def stats(self) -> CacheStats:
        pinned_nodes: set[TreeNode] = set()
        for node in self._pinned:
            cur: TreeNode | None = node
            while cur is not None and cur.parent is not None and cur not in pinned_nodes:
                pinned_nodes.add(cur)
                cur = cur.parent
        return CacheStats(
            num_pages=self.num_pages,
            page_size=self.page_size,
            free=self._alloc.num_free,
            cached=self._cached_pages,
            leased=self._leased_pages,
            locked=self._locked_pages,
            pinned=sum(n.num_pages for n in pinned_nodes),
            tokens_queried=self._tokens_queried,
            tokens_hit=self._tokens_hit,
            evictions=self._evictions,
            num_leases=len(self._leases),
            num_nodes=self._num_nodes,
            policy=self.policy.name,
        )

    @property
    def num_namespaces(self) -> int:
        """Namespaces with a root now: those with cached pages or a live lease (idle empty ones are dropped)."""
        return len(self._roots)

    def dump(self, max_nodes: int = 200) -> TreeDump:
        """Bounded nested view of the tree (breadth-first, at most ``max_nodes`` nodes)."""
        return dump_tree(self._roots, check_count(max_nodes, "max_nodes"), self._num_nodes, self.page_size)

    def check(self) -> None:
        """Raise IntegrityError (with the numbers) if any invariant of the page states or locks is broken."""
        check_cache(self)
