"""The integrity check and the bounded admin dump: read-only walks over a PrefixCache's internals."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from cachemgr.cache.evictor import is_evictable
from cachemgr.cache.node import TreeNode
from cachemgr.cache.types import DumpNamespace, DumpNode, IntegrityError, Namespace, TreeDump

if TYPE_CHECKING:
    from cachemgr.cache.prefix_cache import PrefixCache

_FREE, _CACHED, _LEASED = 1, 2, 3
_PREVIEW_TOKENS = 8


def _nodes(root: TreeNode) -> list[TreeNode]:
    out: list[TreeNode] = []
    stack = list(root.children.values())
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


def check_cache(cache: PrefixCache) -> None:
    """Raise IntegrityError unless every page is in exactly one state and all counters and locks agree."""
    c = cache
    pb = c._page_bytes
    state = np.zeros(c.num_pages, dtype=np.int8)

    def mark(pages: list[int], kind: int, where: str) -> None:
        arr = np.asarray(pages, dtype=np.int64)
        if len(arr) and (arr.min() < 0 or arr.max() >= c.num_pages):
            raise IntegrityError(f"{where}: page id out of range")
        if len(np.unique(arr)) != len(arr) or np.any(state[arr] != 0):
            raise IntegrityError(f"{where}: a page is in two places")
        state[arr] = kind

    mark(c._alloc.free_ids(), _FREE, "free list")
    expected_locks: dict[TreeNode, int] = {}
    for state_ in c._leases.values():
        mark(sorted(state_.owned), _LEASED, f"lease {state_.lease_id}")
        node: TreeNode | None = state_.node
        while node is not None and node.parent is not None:
            expected_locks[node] = expected_locks.get(node, 0) + 1
            node = node.parent
        if node is None or node is not c._roots.get(state_.namespace):
            raise IntegrityError(f"lease {state_.lease_id}: locked node is not in its namespace's tree")
        expected_locks[node] = expected_locks.get(node, 0) + 1  # a root counts its namespace's leases
    for ns, root in c._roots.items():
        if root.lock_count != expected_locks.get(root, 0):
            raise IntegrityError(
                f"root of {ns}: lock count {root.lock_count}, leases {expected_locks.get(root, 0)}"
            )
        if root.lock_count == 0 and not root.children:
            raise IntegrityError(f"root of {ns}: empty and idle but kept (namespaces must not accumulate)")
    num_nodes = cached = locked = 0
    heap_seqs = c._heap.valid_seqs()
    for ns, root in c._roots.items():
        for node in _nodes(root):
            num_nodes += 1
            where = f"node at page {node.depth_pages} of {ns}"
            mark(node.page_ids.tolist(), _CACHED, where)
            cached += node.num_pages
            parent = node.parent
            if parent is None or parent.children.get(node.key) is not node or node.namespace != ns:
                raise IntegrityError(f"{where}: not linked under its parent")
            if node.num_pages == 0 or len(node.token_bytes) != node.num_pages * pb:
                raise IntegrityError(
                    f"{where}: {len(node.token_bytes)} token bytes for {node.num_pages} pages"
                )
            if node.key != node.token_bytes[:pb] or node.depth_pages != parent.end_pages:
                raise IntegrityError(f"{where}: key or depth disagrees with its tokens / parent")
            if node.lock_count != expected_locks.get(node, 0):
                raise IntegrityError(
                    f"{where}: lock count {node.lock_count}, leases hold {expected_locks.get(node, 0)}"
                )
            if parent.parent is not None and parent.lock_count < node.lock_count:
                raise IntegrityError(f"{where}: locked {node.lock_count} but its parent {parent.lock_count}")
            if node.lock_count:
                locked += node.num_pages
            if node.pin_count < 0 or (node.pin_count > 0) != (node in c._pinned):
                raise IntegrityError(f"{where}: pin count {node.pin_count} disagrees with the pinned set")
            if is_evictable(node) and node.heap_seq not in heap_seqs:
                raise IntegrityError(f"{where}: evictable leaf missing from the eviction heap")
    counts = {k: int(np.count_nonzero(state == v)) for k, v in (("free", _FREE), ("cached", _CACHED),
                                                                  ("leased", _LEASED))}  # fmt: skip
    unaccounted = c.num_pages - sum(counts.values())
    if unaccounted:
        raise IntegrityError(f"{unaccounted} pages in no state: {counts}, num_pages={c.num_pages}")
    recorded = {"free": c._alloc.num_free, "cached": c._cached_pages, "leased": c._leased_pages}
    if recorded != counts or c._locked_pages != locked or c._num_nodes != num_nodes:
        raise IntegrityError(
            f"counters {recorded}, locked={c._locked_pages}, nodes={c._num_nodes}; "
            f"actual {counts}, locked={locked}, nodes={num_nodes}"
        )
    for state_ in c._leases.values():
        if (len(state_.path_page_ids) != state_.locked_pages or state_.node.end_pages != state_.locked_pages
                or len(state_.path_bytes) != state_.locked_pages * pb):  # fmt: skip
            raise IntegrityError(f"lease {state_.lease_id}: locked path length disagrees with its node")


def _dump_node(node: TreeNode, page_size: int) -> DumpNode:
    preview = tuple(np.frombuffer(node.token_bytes[: 4 * _PREVIEW_TOKENS], dtype=np.int32).tolist())
    return DumpNode(preview, node.num_pages, node.depth_pages, node.lock_count, node.pin_count > 0,
                    node.last_access, (), len(node.children))  # fmt: skip


def dump_tree(roots: dict[Namespace, TreeNode], max_nodes: int, num_nodes: int, page_size: int) -> TreeDump:
    """Breadth-first view of at most ``max_nodes`` nodes; deeper or later siblings are counted, not shown."""
    shown: dict[TreeNode, list[TreeNode]] = {}
    queue: deque[TreeNode] = deque(roots.values())
    budget = max_nodes
    for root in roots.values():
        shown[root] = []
    while queue and budget > 0:
        node = queue.popleft()
        for child in sorted(node.children.values(), key=lambda n: -n.last_access):
            if budget == 0:
                break
            shown[node].append(child)
            shown[child] = []
            queue.append(child)
            budget -= 1

    def build(node: TreeNode) -> DumpNode:
        kids = tuple(build(child) for child in shown[node])
        base = _dump_node(node, page_size)
        return DumpNode(base.token_preview, base.num_pages, base.depth_pages, base.lock_count, base.pinned,
                        base.last_access, kids, len(node.children) - len(kids))  # fmt: skip

    namespaces = []
    for ns, root in roots.items():
        kids = tuple(build(child) for child in shown[root])
        total = sum(n.num_pages for n in _nodes(root))
        namespaces.append(DumpNamespace(ns.model, ns.salt, total, kids, len(root.children) - len(kids)))
    shown_count = max_nodes - budget
    return TreeDump(tuple(namespaces), shown_count, num_nodes, shown_count < num_nodes)
