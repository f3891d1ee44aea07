"""Read-only lookups in the tree: walking committed nodes along a prompt, and finding pending prefixes.

Nothing here changes a node. Tokens travel as little-endian int32 bytes (``page_bytes`` = 4 * page_size
per page), so comparisons are exact byte comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cachemgr.cache.lease_state import LeaseState
from cachemgr.cache.node import TreeNode, common_pages
from cachemgr.cache.types import Namespace

Tokens = Sequence[int] | np.ndarray
EMPTY_PAGE_IDS = np.empty(0, dtype=np.int32)
EMPTY_PAGE_IDS.flags.writeable = False


class MatchHandle:
    """What ``match`` found, reusable by ``open_lease`` while ``epoch`` (tree shape) is unchanged."""

    __slots__ = ("epoch", "namespace", "partial", "partial_pages", "path", "token_bytes")

    def __init__(self, epoch: int, namespace: Namespace, token_bytes: bytes, path: list[TreeNode],
                 partial: TreeNode | None, partial_pages: int) -> None:  # fmt: skip
        self.epoch = epoch
        self.namespace = namespace
        self.token_bytes = token_bytes
        self.path = path
        self.partial = partial
        self.partial_pages = partial_pages


def walk(node: TreeNode, tb: bytes, pos: int, page_bytes: int,
         page_size: int) -> tuple[list[TreeNode], TreeNode | None, int]:  # fmt: skip
    """Follow committed nodes along ``tb`` from byte ``pos`` below ``node``.

    Returns the fully matched nodes, and the node matched only in part with its matched page count.
    Tokens are always compared byte for byte, so the result is exact.
    """
    path: list[TreeNode] = []
    n = len(tb)
    children = node.children
    while pos < n:
        child = children.get(tb[pos : pos + page_bytes])
        if child is None:
            break
        if tb.startswith(child.token_bytes, pos):  # compares in place, no slice copy
            path.append(child)
            children = child.children
            pos += len(child.token_bytes)
            continue
        end = pos + len(child.token_bytes)
        return path, child, common_pages(child.token_bytes, tb[pos:end], page_size)
    return path, None, 0


def pending_below(end: TreeNode, tb: bytes, matched_pages: int, page_bytes: int,
                  page_size: int) -> tuple[int, int | None]:  # fmt: skip
    """Longest prefix of ``tb`` (in pages) that a lease registered at ``end`` is computing, and that
    lease's id; ``(matched_pages, None)`` when no lease computes more than the match."""
    best_pages, best_id = matched_pages, None
    if end.pending:
        start = end.end_pages * page_bytes
        for lease_id, state in end.pending.items():
            assert isinstance(state, LeaseState)
            limit = state.pending_end_pages * page_bytes
            pages = end.end_pages + common_pages(tb[start:limit], state.prompt_bytes[start:limit],
                                                 page_size)  # fmt: skip
            if pages > best_pages:
                best_pages, best_id = pages, lease_id
    return best_pages, best_id
