"""Eviction policies: which unlocked, unpinned leaf loses its tail pages first (lowest priority first).

The tree keeps ``last_access`` (logical clock of the last lease that used a node) and ``hits`` (how
many leases used it) on every node; a policy turns them into a priority. The priority is read when a
node is pushed onto the eviction heap (it became an evictable leaf, or was trimmed), so a policy whose
numbers change with time must fold that into the value it returns then (see GDSF's inflation clock).
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

    @abstractmethod
    def priority(self, node: TreeNode) -> float:
        """Eviction key of an evictable leaf now; lower is evicted first."""


class LRUPolicy(EvictionPolicy):
    """Least recently used (SGLang's default): the baseline."""

    name = "lru"

    def priority(self, node: TreeNode) -> float:
        return float(node.last_access)


POLICIES: dict[str, type[EvictionPolicy]] = {LRUPolicy.name: LRUPolicy}
DEFAULT_POLICY = "lru"


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy instance by name; ValueError names the known ones."""
    cls = POLICIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown eviction policy {name!r}; known: {sorted(POLICIES)}")
    return cls()
