"""Hook for KV cache events (vLLM's BlockStored / BlockRemoved / AllBlocksCleared).

The cache calls these synchronously from inside its mutating methods, so an implementation must be
cheap and must not call back into the cache (queue the event and publish it elsewhere).
"""

from __future__ import annotations

from typing import Protocol

from cachemgr.cache.types import Namespace


class CacheEvents(Protocol):
    def blocks_stored(
        self,
        namespace: Namespace,
        parent_block_hash: int | None,
        block_hashes: list[int],
        token_ids: list[int],
        page_size: int,
    ) -> None:
        """Pages were committed: ``block_hashes[i]`` names page i of ``token_ids``, chained after the parent
        block (None: the pages start at position 0). Hashes are stable 63-bit ints (see hashing.py)."""

    def blocks_removed(self, namespace: Namespace, block_hashes: list[int]) -> None:
        """Pages left the tree (eviction or flush)."""

    def all_cleared(self) -> None:
        """The tree is empty now (a flush dropped everything); receivers forget every block."""
