"""The cache core: a radix tree over KV pages with leases, pending prefixes, pins and pluggable eviction.

Pure library: no sockets, no asyncio, no torch. Single-threaded (call it from the daemon's loop thread).
"""

from __future__ import annotations

from cachemgr.cache.events import CacheEvents
from cachemgr.cache.policy import (
    DEFAULT_POLICY,
    POLICIES,
    EvictionPolicy,
    GhostPolicy,
    LFRUPolicy,
    LRUPolicy,
    make_policy,
)
from cachemgr.cache.prefix_cache import PrefixCache
from cachemgr.cache.types import (
    CacheStats,
    CommitResult,
    DumpNamespace,
    DumpNode,
    IntegrityError,
    Lease,
    MatchResult,
    Namespace,
    TreeDump,
)

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "CacheEvents",
    "CacheStats",
    "CommitResult",
    "DumpNamespace",
    "DumpNode",
    "EvictionPolicy",
    "GhostPolicy",
    "IntegrityError",
    "LFRUPolicy",
    "LRUPolicy",
    "Lease",
    "MatchResult",
    "Namespace",
    "PrefixCache",
    "TreeDump",
    "make_policy",
]
