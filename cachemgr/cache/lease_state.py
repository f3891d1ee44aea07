"""Mutable bookkeeping of one lease (internal to PrefixCache)."""

from __future__ import annotations

import numpy as np

from cachemgr.cache.node import TreeNode
from cachemgr.cache.types import Namespace


class LeaseState:
    """What a lease holds: one locked path (root .. ``node``), owned pages, and a pending registration.

    ``path_bytes`` are the tokens of the locked path, which ends exactly at ``node``'s end,
    ``locked_pages`` pages from position 0; ``prompt_bytes`` the full pages of the prompt it opened with.
    """

    __slots__ = (
        "lease_id",
        "locked_pages",
        "namespace",
        "node",
        "owned",
        "path_bytes",
        "path_page_ids",
        "pending_end_pages",
        "pending_node",
        "prompt_bytes",
    )

    def __init__(self, lease_id: int, namespace: Namespace, node: TreeNode, prompt_bytes: bytes,
                 path_page_ids: np.ndarray, page_bytes: int) -> None:  # fmt: skip
        self.lease_id = lease_id
        self.namespace = namespace
        self.node = node
        self.locked_pages = node.end_pages
        self.prompt_bytes = prompt_bytes
        self.path_bytes = prompt_bytes[: node.end_pages * page_bytes]
        self.path_page_ids = path_page_ids
        self.owned: set[int] = set()
        self.pending_node: TreeNode | None = None
        self.pending_end_pages = 0

    def register_pending(self, node: TreeNode, end_pages: int) -> None:
        """Announce that this lease computes the prompt's pages from ``node``'s end up to ``end_pages``."""
        self.unregister_pending()
        if node.pending is None:
            node.pending = {}
        node.pending[self.lease_id] = self
        self.pending_node = node
        self.pending_end_pages = end_pages

    def unregister_pending(self) -> None:
        node = self.pending_node
        if node is not None and node.pending is not None:
            node.pending.pop(self.lease_id, None)
            if not node.pending:
                node.pending = None
        self.pending_node = None
        self.pending_end_pages = 0

    def move_to(self, node: TreeNode, path_bytes: bytes, path_page_ids: np.ndarray) -> None:
        """The locked path now ends at ``node`` (a descendant of the old end, already locked by the caller)."""
        self.node = node
        self.locked_pages = node.end_pages
        self.path_bytes = path_bytes
        self.path_page_ids = path_page_ids

    def pending_committed(self, committed_pages: int) -> None:
        """Pages up to ``committed_pages`` are in the tree now: pending moves below them or ends."""
        if self.pending_node is None:
            return
        if committed_pages >= self.pending_end_pages:
            self.unregister_pending()
        elif committed_pages > self.pending_node.end_pages:
            self.register_pending(self.node, self.pending_end_pages)
