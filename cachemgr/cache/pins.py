"""Pins: an admin's "keep this prefix" that eviction and flush respect until it is undone.

A pin counts on the node that ends exactly at the pinned prefix (split off when the prefix ends inside a
node); that node and its ancestors are then never evictable leaves. The cache keeps the set of nodes
with a pin count above zero, so stats can total the pinned pages without walking the tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cachemgr.cache.evictor import is_evictable
from cachemgr.cache.matching import Tokens, walk
from cachemgr.cache.node import TreeNode
from cachemgr.cache.tree_edits import split_node
from cachemgr.cache.types import Namespace
from cachemgr.cache.validate import as_int32_ids, check_namespace

if TYPE_CHECKING:
    from cachemgr.cache.prefix_cache import PrefixCache


def pin_prefix(cache: PrefixCache, namespace: Namespace, tokens: Tokens) -> int:
    """Pin the committed prefix of ``tokens``; returns the pinned length in tokens (0: nothing cached)."""
    found = _walk_full_pages(cache, namespace, tokens)
    if found is None:
        return 0
    path, partial, partial_pages = found
    if partial is not None:
        path.append(split_node(cache, partial, partial_pages))
    if not path:
        return 0
    end = path[-1]
    end.pin_count += 1
    cache._pinned.add(end)
    return end.end_pages * cache.page_size


def unpin_prefix(cache: PrefixCache, namespace: Namespace, tokens: Tokens) -> int:
    """Undo one pin of the same prefix; returns the unpinned length (0 when it was not pinned)."""
    found = _walk_full_pages(cache, namespace, tokens)
    if found is None:
        return 0
    path, partial, _ = found
    if partial is not None or not path:  # a pinned prefix ends at a node boundary
        return 0
    end = path[-1]
    if end.pin_count == 0:
        return 0
    end.pin_count -= 1
    if end.pin_count == 0:
        cache._pinned.discard(end)
        if is_evictable(end):
            cache._heap.push(end, cache.policy.priority(end))
    return end.end_pages * cache.page_size


def num_pinned_pages(pinned: set[TreeNode]) -> int:
    """Pages protected by the pinned nodes: each node and its ancestors, counted once."""
    protected: set[TreeNode] = set()
    for node in pinned:
        cur: TreeNode | None = node
        while cur is not None and cur.parent is not None and cur not in protected:
            protected.add(cur)
            cur = cur.parent
    return sum(n.num_pages for n in protected)


def _walk_full_pages(cache: PrefixCache, namespace: Namespace,
                     tokens: Tokens) -> tuple[list[TreeNode], TreeNode | None, int] | None:  # fmt: skip
    """``walk`` over the full pages of ``tokens`` from the namespace's root; None when it has no root."""
    check_namespace(namespace)
    arr = as_int32_ids(tokens, "tokens")
    root = cache._roots.get(namespace)
    if root is None:
        return None
    tb = arr[: len(arr) // cache.page_size * cache.page_size].tobytes()
    return walk(root, tb, 0, cache._page_bytes, cache.page_size)
