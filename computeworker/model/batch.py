"""What one forward pass sees: the batch layout (FlashInfer's ragged/paged conventions) and the attention
backend interface that the model calls for every layer.

A batch mixes prefill chunks and decode steps. For sequence b::

    positions:   0 .......... kv_len[b]-q_len[b] ............ kv_len[b]-1
                 |<---- already in the pool ---->|<-- q_len[b] new -->|
    pages:       kv_page_ids[kv_indptr[b] : kv_indptr[b+1]]   (covering all kv_len[b] positions)

The new tokens' K/V go to (write_page_ids[t], write_slots[t]); the backend writes them before it attends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64, the new tokens of every sequence, concatenated
    positions: torch.Tensor  # [T] int64, absolute positions (RoPE)
    qo_indptr: torch.Tensor  # [B+1] int32, cumulative new-token counts
    kv_indptr: torch.Tensor  # [B+1] int32, cumulative page counts
    kv_page_ids: torch.Tensor  # [P] int32, each sequence's pages in order
    kv_last_page_len: torch.Tensor  # [B] int32, tokens in each sequence's last page (1..page_size)
    write_page_ids: torch.Tensor  # [T] int64, page receiving each new token's K/V
    write_slots: torch.Tensor  # [T] int64, slot within that page
    q_lens: tuple[int, ...]  # host copies, for backends that loop on the host
    kv_lens: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (the decode kernel applies)."""
        return all(n == 1 for n in self.q_lens)


class AttentionBackend(Protocol):
    """Paged attention over the shared KV pool. One instance per worker; not thread-safe."""

    def begin(self, batch: ForwardBatch) -> None:
        """Prepare for a forward pass over `batch` (plan once; reused by every layer)."""
        ...

    def forward(
        self,
        layer: int,
        q: torch.Tensor,  # [T, num_qo_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_layer: torch.Tensor,  # pool[layer]: [pages, 2, page_size, num_kv_heads, head_dim]
    ) -> torch.Tensor:
        """Write k/v into kv_layer at the batch's write slots, then return causal attention of q over
        each sequence's whole KV (cached prefix + new tokens): [T, num_qo_heads, head_dim]."""
        ...
