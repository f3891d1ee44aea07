"""Reclaiming cached pages: eviction by policy (when an allocation is short, or on request) and flush.

Only unlocked, unpinned leaves lose pages, and a leaf loses its tail first, so what stays is still a
prefix. The edits themselves go through tree_edits.py, which keeps the cache's counters and KV events in
step; eviction also counts what it freed and tells the policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cachemgr.cache.node import TreeNode
from cachemgr.cache.tree_edits import detach_leaf, drop_root_if_idle, trim_tail

if TYPE_CHECKING:
    from cachemgr.cache.prefix_cache import PrefixCache


def evict_pages(cache: PrefixCache, num_pages: int) -> int:
    """Free at least ``num_pages`` cached pages, lowest priority first; returns how many were freed
    (fewer when nothing else is evictable). A leaf that has more pages than needed keeps its head."""
    heap = cache._heap
    priority_of = cache.policy.priority
    evict_hook = cache._evict_hook
    evict_tail_hook = cache._evict_tail_hook
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
        trim_tail(cache, node, keep)
        if evict_hook is not None:
            evict_hook(node, priority)
        evicted += have - keep
        if keep:
            heap.push(node, priority_of(node))
        else:
            parent = node.parent
            assert parent is not None
            detach_leaf(cache, node)
            if not parent.children and parent.lock_count == 0 and parent.pin_count == 0:
                if parent.parent is not None:
                    heap.push(parent, priority_of(parent))  # it just became an evictable leaf
                else:
                    drop_root_if_idle(cache, parent)
    cache._evictions += evicted
    return evicted


def flush_tree(cache: PrefixCache) -> int:
    """Drop every node that is not locked, not pinned and has no such descendant; returns pages freed.

    Emits blocks_removed for what was dropped, then all_cleared when the tree ended up empty.
    """
    freed = 0
    for root in cache._roots.values():
        order: list[TreeNode] = []
        stack = list(root.children.values())
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        for node in reversed(order):  # children before parents
            if node.lock_count == 0 and node.pin_count == 0 and not node.children:
                freed += node.num_pages
                trim_tail(cache, node, 0)
                detach_leaf(cache, node)
    for root in list(cache._roots.values()):
        drop_root_if_idle(cache, root)
    if freed and cache._cached_pages == 0 and cache._events is not None:
        cache._events.all_cleared()
    return freed
