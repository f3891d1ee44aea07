"""The eviction policy interface: what the tree tells a policy, and the one number a policy returns.

The tree keeps ``last_access`` (logical clock of the last lease that used a node) and ``hits`` (how
many leases used it) on every node; a policy turns them into a priority. The priority is read when a
node is pushed onto the eviction heap (it became an evictable leaf, or was trimmed), so a policy whose
numbers change with time must fold that into the value it returns then.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from cachemgr.cache.node import TreeNode


class EvictionPolicy(ABC):
    """Pluggable ranking. Implementations must be deterministic and must not change the tree."""

    name: ClassVar[str]

    def on_insert(self, node: TreeNode, now: int) -> None:  # noqa: B027 - optional hook
        """A committed node entered the tree (its parent is already linked)."""

    def on_use(self, path: list[TreeNode], now: int) -> None:  # noqa: B027 - optional hook
        """A lease locked ``path`` (root side first); the tree already updated last_access and hits."""

    def on_evict(self, node: TreeNode, priority: float) -> None:  # noqa: B027 - optional hook
        """Pages of ``node`` were evicted at ``priority``."""

    def attach(self, num_pages: int, page_size: int) -> None:  # noqa: B027 - optional hook
        """The cache that will call this policy was created with this pool (called once, first)."""

    def on_evict_tail(self, node: TreeNode, keep: int) -> None:  # noqa: B027 - optional hook
        """The pages of ``node`` after its first ``keep`` are about to be evicted (node not changed yet)."""

    def on_miss(self, end: TreeNode, token_bytes: bytes) -> None:  # noqa: B027 - optional hook
        """A lease locked up to ``end`` (a namespace root when nothing matched) but its prompt
        ``token_bytes`` (whole pages) goes on: the page at ``end.end_pages`` was missing. Called after
        ``on_use``, only when something was missing and only if the policy overrides it."""

    def on_lease(self, end: TreeNode, token_bytes: bytes) -> None:  # noqa: B027 - optional hook
        """A lease locked up to ``end`` (a namespace root when nothing matched) for a prompt whose full
        pages are ``token_bytes``; every lease, after ``on_use`` and ``on_miss``. Called only if the
        policy overrides it."""

    @abstractmethod
    def priority(self, node: TreeNode) -> float:
        """Eviction key of an evictable leaf now; lower is evicted first."""
