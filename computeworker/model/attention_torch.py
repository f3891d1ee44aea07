"""TorchAttention: the reference paged-attention backend (CPU serving, and the oracle for FlashInfer).

For each layer: scatter the new tokens' K/V into their pages, then for each sequence gather its pages
into a contiguous [kv_len, kv_heads, head_dim] view and run scaled_dot_product_attention. The new
queries are the LAST q_len of the kv_len positions, so query i (0-based) may see keys 0..kv_len-q_len+i::

                 keys ->   0 1 2 3 4 5        kv_len = 6, q_len = 2
    query 0 (pos 4)        x x x x x .
    query 1 (pos 5)        x x x x x x

SDPA's own `is_causal` aligns the triangle top-left, which is only right when q_len == kv_len, so other
cases get an explicit mask. GQA: SDPA's enable_gqa shares each K/V head among num_heads/num_kv_heads
query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from computeworker.model.batch import ForwardBatch


@dataclass(frozen=True, slots=True)
class _SeqPlan:
    q_start: int
    q_end: int
    kv_len: int
    k_rows: torch.Tensor  # [kv_len] int64 row of each position's K in the flat layer view
    v_rows: torch.Tensor  # the same for V (page_size rows after K)
    mask: torch.Tensor | None  # [q_len, kv_len] bool, True = may attend; None when SDPA needs no mask


class TorchAttention:
    """AttentionBackend in plain torch. One instance per worker; not thread-safe.

    State: the plan of the current batch (replaced by every `begin`). Must hold: `begin(batch)` before
    the layers' `forward` calls of that batch; every layer of the pool has the same page size."""

    def __init__(self) -> None:
        self._plans: list[_SeqPlan] | None = None
        self._write_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._page_size: int | None = None
        self._batch: ForwardBatch | None = None

    def begin(self, batch: ForwardBatch) -> None:
        """Plan `batch`: page-table row indices and masks, built once and reused by every layer. The page
        size is learned from the first layer's pool tensor, so the row indices are made lazily."""
        self._batch = batch
        self._plans = None
        self._write_rows = None
        self._page_size = None

    def _plan(self, page_size: int) -> None:
        batch = self._batch
        if batch is None:
            raise ValueError("forward() before begin(): no batch is planned")
        device = batch.kv_page_ids.device
        slot_in_page = torch.arange(page_size, device=device, dtype=torch.int64)
        page_ids = batch.kv_page_ids.to(torch.int64)
        kv_indptr = batch.kv_indptr.tolist()
        plans = []
        q_start = 0
        for b, (q_len, kv_len) in enumerate(zip(batch.q_lens, batch.kv_lens, strict=True)):
            pages = page_ids[kv_indptr[b] : kv_indptr[b + 1]]
            rows = (pages[:, None] * (2 * page_size) + slot_in_page[None, :]).reshape(-1)[:kv_len]
            mask = None
            if 1 < q_len < kv_len:
                q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
                mask = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]
            plans.append(_SeqPlan(q_start, q_start + q_len, kv_len, rows, rows + page_size, mask))
            q_start += q_len
        self._plans = plans
        k_write = batch.write_page_ids * (2 * page_size) + batch.write_slots
        self._write_rows = (k_write, k_write + page_size)
        self._page_size = page_size

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
    ) -> torch.Tensor:
        """Write k/v at the batch's write slots of `kv_layer` ([pages, 2, page_size, kv_heads, head_dim]),
        then attend: returns [T, num_heads, head_dim] in q's dtype."""
        page_size = kv_layer.shape[2]
        if self._page_size != page_size:
            self._plan(page_size)
        assert self._plans is not None and self._write_rows is not None
        kv_heads, head_dim = kv_layer.shape[3], kv_layer.shape[4]
        # The layer as rows of [kv_heads, head_dim]: page p's K slot s is row (2p)*page_size + s and its V
        # slot is page_size rows later. view() (not reshape) so a non-contiguous pool fails loudly
        # instead of silently writing into a copy.
        rows = kv_layer.view(-1, kv_heads, head_dim)
        rows.index_copy_(0, self._write_rows[0], k.to(kv_layer.dtype))
        rows.index_copy_(0, self._write_rows[1], v.to(kv_layer.dtype))
        out = torch.empty_like(q)
        for plan in self._plans:
            qs = q[plan.q_start : plan.q_end].transpose(0, 1)  # [heads, q_len, dim]
            ks = rows.index_select(0, plan.k_rows).transpose(0, 1).to(q.dtype)  # [kv_heads, kv_len, dim]
            vs = rows.index_select(0, plan.v_rows).transpose(0, 1).to(q.dtype)
            is_causal = plan.mask is None and plan.q_end - plan.q_start > 1  # q_len == kv_len
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=plan.mask, is_causal=is_causal, enable_gqa=True
            )
            out[plan.q_start : plan.q_end] = o.transpose(0, 1)
        return out
