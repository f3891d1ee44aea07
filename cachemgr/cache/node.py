"""Radix tree node: one edge of whole pages, keyed in its parent by the bytes of its first page.

Token layout of a node (``pb`` = page_size * 4 bytes, tokens are little-endian int32)::

    depth_pages                       depth_pages + num_pages
    |  page 0  |  page 1  |  ...  |  page n-1  |
    |<-- key -->|
    |<------------------ token_bytes ---------->|   page_ids[i] backs page i

Lock counts: a lease locks every node from its deepest one up to the namespace root, so a node's
lock count is at least the sum of its children's. Only unlocked, unpinned leaves are evictable.
A namespace root's lock count is the number of live leases in its namespace; a root with no children and
no leases is dropped, so namespaces (cache salts) do not accumulate.
"""

from __future__ import annotations

import numpy as np

from cachemgr.cache.types import Namespace


class TreeNode:
    """Mutable tree node. Only the cache core (PrefixCache and its helpers) changes these fields; policies
    read them and set ``priority``."""

    __slots__ = (
        "block_hashes",
        "children",
        "depth_pages",
        "heap_seq",
        "hits",
        "key",
        "last_access",
        "lock_count",
        "namespace",
        "page_ids",
        "parent",
        "pending",
        "pin_count",
        "prefix_hashes",
        "priority",
        "token_bytes",
    )

    def __init__(
        self,
        namespace: Namespace,
        parent: TreeNode | None,
        token_bytes: bytes,
        page_ids: np.ndarray,
        depth_pages: int,
        key: bytes,
    ) -> None:
        self.namespace = namespace
        self.parent = parent
        self.key = key
        self.token_bytes = token_bytes
        self.page_ids = page_ids
        self.depth_pages = depth_pages
        self.children: dict[bytes, TreeNode] = {}
        self.lock_count = 0
        self.pin_count = 0
        self.last_access = 0
        self.hits = 0
        self.priority = 0.0
        self.heap_seq = -1  # sequence number of this node's only valid eviction-heap entry
        self.pending: dict[int, object] | None = None  # lease id -> lease computing pages below this node
        self.prefix_hashes: np.ndarray | None = None  # uint64 chained hashes, kept only with an events hook
        self.block_hashes: list[int] | None = None

    @property
    def num_pages(self) -> int:
        return len(self.page_ids)

    @property
    def end_pages(self) -> int:
        return self.depth_pages + len(self.page_ids)

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def split(self, num_upper_pages: int, page_bytes: int) -> TreeNode:
        """Cut this node after ``num_upper_pages`` pages; returns the new upper node (the new parent).

        This object keeps the lower part so that leases, pins and children that point at it stay valid;
        the upper part inherits the lock count (everyone locking this node locks its ancestors too).
        """
        cut = num_upper_pages * page_bytes
        parent = self.parent
        assert parent is not None and 0 < num_upper_pages < len(self.page_ids)
        upper = TreeNode(
            self.namespace,
            parent,
            self.token_bytes[:cut],
            self.page_ids[:num_upper_pages],
            self.depth_pages,
            self.key,
        )
        upper.lock_count = self.lock_count
        upper.last_access = self.last_access
        upper.hits = self.hits
        upper.priority = self.priority
        if self.prefix_hashes is not None and self.block_hashes is not None:
            upper.prefix_hashes = self.prefix_hashes[:num_upper_pages]
            upper.block_hashes = self.block_hashes[:num_upper_pages]
            self.prefix_hashes = self.prefix_hashes[num_upper_pages:]
            self.block_hashes = self.block_hashes[num_upper_pages:]
        parent.children[self.key] = upper
        self.token_bytes = self.token_bytes[cut:]
        self.key = self.token_bytes[:page_bytes]
        self.page_ids = self.page_ids[num_upper_pages:]
        self.depth_pages += num_upper_pages
        self.parent = upper
        upper.children[self.key] = self
        return upper


def common_pages(a: bytes, b: bytes, page_size: int) -> int:
    """Number of whole leading pages on which the int32 token byte strings ``a`` and ``b`` agree."""
    n = min(len(a), len(b)) // 4
    x = np.frombuffer(a, dtype=np.int32, count=n)
    y = np.frombuffer(b, dtype=np.int32, count=n)
    diff = np.flatnonzero(x != y)
    first = int(diff[0]) if len(diff) else n
    return first // page_size
