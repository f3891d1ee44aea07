"""Eviction policies: which unlocked, unpinned leaf loses its tail pages first (lowest priority first).

The tree keeps ``last_access`` (logical clock of the last lease that used a node) and ``hits`` (how
many leases used it) on every node; a policy turns them into a priority. The priority is read when a
node is pushed onto the eviction heap (it became an evictable leaf, or was trimmed), so a policy whose
numbers change with time must fold that into the value it returns then (see GDSF's inflation clock).
"""

from __future__ import annotations

import math
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


class LFRUPolicy(EvictionPolicy):
    """Recency plus a frequency credit measured in the cache's own eviction horizon.

    priority = last_access + alpha * horizon * log2(1 + hits), where ``horizon`` is a moving average of
    how long evicted pages had been idle (logical clock ticks). A node used often (a hot system prompt,
    a conversation many turns deep) survives longer than one used once, but the credit is bounded in
    units of the current eviction age, so abandoned conversations still age out, and when the cache is
    large (long horizon, little pressure) the ordering stays close to LRU. No constants depend on the
    trace's time scale: the horizon adapts to capacity and load.
    """

    name = "lfru"

    def __init__(self, alpha: float = 0.25) -> None:
        if not alpha >= 0.0:
            raise ValueError("alpha must be >= 0")
        self.alpha = alpha
        self._horizon = 0.0
        self._now = 0

    def on_insert(self, node: TreeNode, now: int) -> None:
        self._now = now

    def on_use(self, path: list[TreeNode], now: int) -> None:
        self._now = now

    def on_evict(self, node: TreeNode, priority: float) -> None:
        idle = self._now - node.last_access
        # An exponential moving average: reacts to load changes within a few hundred evictions.
        self._horizon = float(idle) if self._horizon == 0.0 else 0.99 * self._horizon + 0.01 * idle

    def priority(self, node: TreeNode) -> float:
        return node.last_access + self.alpha * self._horizon * math.log2(1 + node.hits)


POLICIES: dict[str, type[EvictionPolicy]] = {LRUPolicy.name: LRUPolicy, LFRUPolicy.name: LFRUPolicy}
DEFAULT_POLICY = "lfru"


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy instance by name; ValueError names the known ones."""
    cls = POLICIES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown eviction policy {name!r}; known: {sorted(POLICIES)}")
    return cls()
