"""The checking half of ``PrefixCache.commit``: validate the caller's pages and dedup them against the tree.

Pure: raises ValueError for misuse and changes nothing, so that ``commit`` can mutate afterwards without
a failure half way. Page layout of a commit of ``num`` pages by a lease that has ``locked`` pages::

    page 0              locked                                   k                num
    |-- locked path ------|-- extra nodes --|-- partial (part) --|-- new pages ----|
    |<---------------- tree_ids: the tree's pages win ---------->|<- inserted ---->|

(when ``num <= locked`` the tree already holds everything: ``k == num``). Where the caller's page id
differs from ``tree_ids`` it is a duplicate the lease owns, and the commit frees it.
"""

from __future__ import annotations

import numpy as np

from cachemgr.cache.lease_state import LeaseState
from cachemgr.cache.matching import walk
from cachemgr.cache.node import TreeNode

# (extra, partial, partial_pages, tree_ids, dups, handed_over): a plain tuple, not a NamedTuple, because
# commit is on the request path and this is built once per call.
CommitPlan = tuple[list[TreeNode], TreeNode | None, int, np.ndarray, list[int], set[int]]


def plan_commit(state: LeaseState, tb: bytes, page_ids: np.ndarray, page_size: int,
                page_bytes: int) -> CommitPlan:  # fmt: skip
    """Check a commit of the tokens ``tb`` (int32 bytes) backed by ``page_ids`` and map it onto the tree.

    Returns ``(extra, partial, partial_pages, tree_ids, dups, handed_over)``:

    - ``extra``: committed nodes below the lease's locked end that already hold the next tokens;
    - ``partial``, ``partial_pages``: the node after them holding only its first ``partial_pages``
      pages of the tokens (to be split), or ``(None, 0)``;
    - ``tree_ids``: the pages the tree already has for the leading tokens (see the module diagram);
    - ``dups``: the lease's pages that duplicate ``tree_ids`` (to be freed);
    - ``handed_over``: every page the lease gives up (the new pages and ``dups``), a subset of its own.

    Raises ValueError for partial pages, a page id count that does not match, tokens that differ from
    the locked prefix, or page ids that are neither the lease's (once each) nor already the tree's.
    """
    num_tokens = len(tb) // 4
    if num_tokens % page_size:
        raise ValueError(f"commit needs whole pages: {num_tokens} tokens, page size {page_size}")
    num = num_tokens // page_size
    if len(page_ids) != num:
        raise ValueError(f"{len(page_ids)} page ids for {num} pages of tokens")
    locked = state.locked_pages
    if num >= locked:
        same_prefix = tb.startswith(state.path_bytes)
    else:
        same_prefix = state.path_bytes.startswith(tb)
    if not same_prefix:
        raise ValueError("commit tokens differ from the prefix this lease locked")
    extra: list[TreeNode] = []
    partial, partial_pages = None, 0
    if num > locked:
        extra, partial, partial_pages = walk(state.node, tb, locked * page_bytes, page_bytes, page_size)
    tree_ids = state.path_page_ids[: min(num, locked)]
    if extra or partial is not None:
        tree_parts = [tree_ids] + [n.page_ids for n in extra]
        if partial is not None:
            tree_parts.append(partial.page_ids[:partial_pages])
        tree_ids = np.concatenate(tree_parts)
    k = len(tree_ids)
    if page_ids.tobytes().startswith(tree_ids.tobytes()):  # the usual case: caller reused the tree's pages
        dups: list[int] = []
    else:
        head = page_ids[:k]
        dups = head[head != tree_ids].tolist()
    new_ids = page_ids[k:].tolist()
    handed_over = set(new_ids)
    handed_over.update(dups)
    if len(handed_over) != len(new_ids) + len(dups) or not handed_over <= state.owned:
        raise ValueError("page ids must be owned by this lease (once each) or already back the prefix")
    return extra, partial, partial_pages, tree_ids, dups, handed_over
