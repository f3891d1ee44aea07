"""Eviction order: a binary heap of (priority, seq, node) with lazy deletion.

Why lazy: a node's priority changes on every use, and removing an arbitrary heap entry is O(n). Instead
each push gets a fresh sequence number stored on the node; an entry is valid only while its seq equals
``node.heap_seq`` and the node is still an evictable leaf. Stale entries are skipped when popped and
dropped in bulk when they outnumber live nodes, so memory stays O(nodes) and pops stay O(log n).
Equal priorities pop in push order (older first), which keeps eviction deterministic.
"""

from __future__ import annotations

import heapq

from cachemgr.cache.node import TreeNode


def is_evictable(node: TreeNode) -> bool:
    return (
        node.lock_count == 0
        and node.pin_count == 0
        and not node.children
        and node.parent is not None
        and node.num_pages > 0
    )


class EvictionHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TreeNode]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, node: TreeNode, priority: float) -> None:
        """Make (priority, now) the node's only valid entry. Call when it may have become evictable."""
        self._seq += 1
        node.heap_seq = self._seq
        heapq.heappush(self._heap, (priority, self._seq, node))

    def pop(self) -> tuple[float, TreeNode] | None:
        """Remove and return the lowest-priority evictable leaf, or None when there is none."""
        heap = self._heap
        heappop = heapq.heappop
        while heap:
            priority, seq, node = heappop(heap)
            # is_evictable, inlined: this loop is the eviction hot path
            if (seq == node.heap_seq and node.lock_count == 0 and node.pin_count == 0 and not node.children
                    and node.parent is not None and node.page_ids.size):  # fmt: skip
                node.heap_seq = -1
                return priority, node
        return None

    def compact(self, num_live_nodes: int) -> None:
        """Drop stale entries once they dominate (amortised O(1) per push)."""
        if len(self._heap) > 2 * num_live_nodes + 1024:
            self._heap = [e for e in self._heap if e[1] == e[2].heap_seq and is_evictable(e[2])]
            heapq.heapify(self._heap)

    def valid_seqs(self) -> set[int]:
        """Sequence numbers of the entries still in the heap (for the integrity check)."""
        return {seq for _, seq, _ in self._heap}

    def clear(self) -> None:
        self._heap.clear()
