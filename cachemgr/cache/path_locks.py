"""Lock counts along leases' paths.

A lease locks every node from the deepest one it holds up to its namespace root, so a locked node's
ancestors are locked and a node's lock count is at least the sum of its children's::

    root (counts the namespace's leases) -- a -- b -- c    lease X holds up to c: a, b, c +1 each
                                               \\-- d    lease Y holds up to d: a, b, d +1 each

These helpers change only nodes (lock counts, recency) and leave roots alone; each returns the pages
whose lock state changed, for the cache's locked-page counter. One call per lease operation, with the
per-node loop inside, so the request path pays no extra call per node.
"""

from __future__ import annotations

from cachemgr.cache.node import TreeNode


def lock_path(path: list[TreeNode], now: int) -> int:
    """A new lease uses ``path`` (root side first, root excluded): lock each node once more and count the
    use at ``now``. Returns how many pages were unlocked before."""
    newly_locked = 0
    for node in path:
        if node.lock_count == 0:
            newly_locked += node.num_pages
        node.lock_count += 1
        node.last_access = now
        node.hits += 1
    return newly_locked


def lock_extension(end: TreeNode, locked_end: TreeNode, now: int) -> int:
    """A lease's path grows from ``locked_end`` down to its descendant ``end``: lock the nodes in between
    (``end`` included, ``locked_end`` not, which the lease holds already) and touch them at ``now``.
    Returns how many pages were unlocked before."""
    newly_locked = 0
    node = end
    while node is not locked_end:
        node.lock_count += 1
        if node.lock_count == 1:
            newly_locked += len(node.page_ids)
        node.last_access = now
        parent = node.parent
        assert parent is not None
        node = parent
    return newly_locked


def unlock_path(end: TreeNode) -> tuple[TreeNode, int]:
    """A lease that held up to ``end`` is gone: unlock ``end`` and its ancestors below the root once.
    Returns the root (its count is the caller's) and how many pages became unlocked."""
    unlocked = 0
    node = end
    while node.parent is not None:
        node.lock_count -= 1
        if node.lock_count == 0:
            unlocked += node.num_pages
        node = node.parent
    return node, unlocked
