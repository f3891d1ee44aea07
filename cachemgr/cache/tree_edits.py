"""The only code that adds or removes tree nodes or their pages: insert, split, trim, detach, drop a root.

Each step keeps the PrefixCache's internals in step with the tree: its counters (cached pages, node
count), the ``epoch`` that tells a stale match handle from a current one (bumped on every shape change),
the free list, and the KV events. Callers (the cache, reclaim.py, pins.py) decide *what* to edit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cachemgr.cache.hashing import block_hashes
from cachemgr.cache.node import TreeNode

if TYPE_CHECKING:
    from cachemgr.cache.prefix_cache import PrefixCache


def insert_leaf(cache: PrefixCache, parent: TreeNode, tb: bytes, page_ids: np.ndarray) -> TreeNode:
    """Add a leaf below ``parent`` (whose end is page-aligned with ``tb``'s start); emits blocks_stored."""
    depth = parent.depth_pages + len(parent.page_ids)
    node = TreeNode(parent.namespace, parent, tb, page_ids, depth, tb[: cache._page_bytes])
    parent.children[node.key] = node
    node.last_access = cache._clock
    cache._num_nodes += 1
    cache._cached_pages += len(page_ids)
    cache._epoch += 1
    cache.policy.on_insert(node, cache._clock)
    if cache._hasher is not None and cache._events is not None:
        assert parent.prefix_hashes is not None
        seed = int(parent.prefix_hashes[-1])
        node.prefix_hashes = cache._hasher.prefix_hashes(seed, np.frombuffer(tb, dtype=np.int32))
        node.block_hashes = block_hashes(node.prefix_hashes)
        parent_hash = parent.block_hashes[-1] if parent.block_hashes else None
        cache._events.blocks_stored(node.namespace, parent_hash, list(node.block_hashes),
                                    np.frombuffer(tb, dtype=np.int32).tolist(), cache.page_size)  # fmt: skip
    return node


def split_node(cache: PrefixCache, node: TreeNode, num_upper_pages: int) -> TreeNode:
    """Cut ``node`` after ``num_upper_pages`` pages (see ``TreeNode.split``); returns the new upper node."""
    cache._epoch += 1
    cache._num_nodes += 1
    return node.split(num_upper_pages, cache._page_bytes)


def trim_tail(cache: PrefixCache, node: TreeNode, keep: int) -> None:
    """Free the node's pages after the first ``keep`` (tail first: a prefix must stay a prefix)."""
    page_ids = node.page_ids
    gone = page_ids[keep:].tolist()
    node.page_ids = page_ids[:keep]
    node.token_bytes = node.token_bytes[: keep * cache._page_bytes] if keep else b""
    cache._alloc.give_back(gone)
    cache._cached_pages -= len(gone)
    cache._epoch += 1
    if node.block_hashes is not None and node.prefix_hashes is not None:
        removed = node.block_hashes[keep:]
        node.block_hashes = node.block_hashes[:keep]
        node.prefix_hashes = node.prefix_hashes[:keep]
        if cache._events is not None and removed:
            cache._events.blocks_removed(node.namespace, removed)


def detach_leaf(cache: PrefixCache, node: TreeNode) -> None:
    """Unlink a leaf that ``trim_tail`` emptied from its parent."""
    parent = node.parent
    assert parent is not None and not node.children and node.num_pages == 0
    del parent.children[node.key]
    node.parent = None
    node.heap_seq = -1
    cache._num_nodes -= 1


def drop_root_if_idle(cache: PrefixCache, root: TreeNode) -> None:
    """Forget a namespace whose root has no children and no live lease (hence no pins, locks or
    pending prefixes, which all hang below a child or on a lease).

    Without this, every distinct cache_salt ever seen would keep a root for good: a client sending a
    fresh salt per request would grow the daemon's memory without bound. A later request in the
    namespace simply creates a new root.
    """
    if root.children or root.lock_count:
        return
    assert root.parent is None and root.pending is None
    del cache._roots[root.namespace]
    cache._epoch += 1
