"""Small immutable values the cache hands out, and its integrity error."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class IntegrityError(AssertionError):
    """The cache's bookkeeping broke an invariant (a bug, never caller misuse). The message has the numbers."""


@dataclass(frozen=True, slots=True)
class Namespace:
    """First level of the tree: requests in different namespaces never share a page (a security boundary)."""

    model: str
    salt: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not isinstance(self.salt, str):
            raise ValueError("Namespace model and salt must be strings")


@dataclass(frozen=True, slots=True)
class MatchResult:
    """Longest committed prefix of a prompt, plus the longest prefix some live lease is computing now.

    ``page_ids`` are safe to use only once a lease locks them (``open_lease``). ``handle`` lets
    ``open_lease`` skip re-matching when the tree has not changed since; callers treat it as opaque.
    """

    matched_len: int
    page_ids: np.ndarray
    pending_len: int
    pending_lease_id: int | None
    handle: object = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Lease:
    """A request's hold on the cache: its matched prefix is locked until ``release``."""

    lease_id: int
    matched_len: int
    prefix_page_ids: np.ndarray


@dataclass(frozen=True, slots=True)
class CommitResult:
    """Which pages back the committed tokens now (tree pages win over the lease's duplicates)."""

    page_ids: np.ndarray
    num_new_pages: int
    num_duplicate_pages: int


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counts at one moment. ``free + cached + leased == num_pages`` always holds.

    cached: pages in the tree; leased: pages owned by leases and not committed; locked and pinned are
    subsets of cached. tokens_queried / tokens_hit count ``match`` calls; evictions counts pages.
    """

    num_pages: int
    page_size: int
    free: int
    cached: int
    leased: int
    locked: int
    pinned: int
    tokens_queried: int
    tokens_hit: int
    evictions: int
    num_leases: int
    num_nodes: int
    policy: str

    @property
    def hit_rate(self) -> float:
        return self.tokens_hit / self.tokens_queried if self.tokens_queried else 0.0


@dataclass(frozen=True, slots=True)
class DumpNode:
    """One node of the bounded tree view: a radix edge (a run of pages stored and locked together)."""

    token_preview: tuple[int, ...]
    num_pages: int
    depth_pages: int
    lock_count: int
    pinned: bool
    last_access: int
    children: tuple[DumpNode, ...]
    num_hidden_children: int


@dataclass(frozen=True, slots=True)
class DumpNamespace:
    model: str
    salt: str
    num_pages: int
    children: tuple[DumpNode, ...]
    num_hidden_children: int


@dataclass(frozen=True, slots=True)
class TreeDump:
    """Bounded nested view of the tree for the admin ``tree`` command (at most ``max_nodes`` nodes)."""

    namespaces: tuple[DumpNamespace, ...]
    num_nodes_shown: int
    num_nodes_total: int
    truncated: bool
