"""TorchAttention: the reference paged-attention backend (CPU serving, and the oracle for FlashInfer).

For each layer: scatter the new tokens' K/V into their pages, then for each sequence gather its pages
into a contiguous [kv_len, kv_heads, head_dim] view and run scaled_dot_product_attention. The new
queries are the LAST q_len of the kv_len positions, so query i (0-based) may see keys 0..kv_len-q_len+i::

                 keys ->   0 1 2 3 4 5        kv_len = 6, q_len = 2
    query 0 (pos 4)        x x x x x .
    query 1 (pos 5)        x x x x x x

SDPA's own `is_causal` aligns the triangle top-left, which is only right when q_len == kv_len, so other
cases get an explicit mask. GQA: when q_len == kv_len, SDPA's enable_gqa shares each K/V head among its
group of query heads; otherwise (decode, prefill over a cached prefix) the group's queries are folded into
one [kv_heads, group * q_len] query block with the mask repeated per group member. On CPU the folded form
runs the fused kernel, where enable_gqa falls back to a slow path (measured 4x slower for decode).
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
    # [group * q_len, kv_len] bool, True = may attend (rows: group member major, then query); None for
    # decode (nothing to hide) and for q_len == kv_len (SDPA's is_causal)
    mask: torch.Tensor | None


class TorchAttention:
    """AttentionBackend in plain torch. One instance per worker; not thread-safe.

    State: the plan of the current batch (replaced by every `begin`). Must hold: `begin(batch)` before
    the layers' `forward` calls of that batch; every layer of the pool has the same page size."""

    def __init__(self) -> None:
        self._plans: list[_SeqPlan] | None = None
        self._write_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._page_size: int | None = None
        self._group: int | None = None
        self._batch: ForwardBatch | None = None

    def begin(self, batch: ForwardBatch) -> None:
        """Plan `batch`: page-table row indices and masks, built once and reused by every layer. The page
        size is learned from the first layer's pool tensor, so the row indices are made lazily."""
        self._batch = batch
        self._plans = None
        self._write_rows = None
        self._page_size = None
        self._group = None

    def _plan(self, page_size: int, group: int) -> None:
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
                mask = (torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]).repeat(group, 1)
            plans.append(_SeqPlan(q_start, q_start + q_len, kv_len, rows, rows + page_size, mask))
            q_start += q_len
        self._plans = plans
        k_write = batch.write_page_ids * (2 * page_size) + batch.write_slots
        self._write_rows = (k_write, k_write + page_size)
        self._page_size = page_size
        self._group = group

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
        page_size, kv_heads, head_dim = kv_layer.shape[2], kv_layer.shape[3], kv_layer.shape[4]
        num_heads = q.shape[1]
        group = num_heads // kv_heads
        if self._page_size != page_size or self._group != group:
            self._plan(page_size, group)
        assert self._plans is not None and self._write_rows is not None
        # The layer as rows of [kv_heads, head_dim]: page p's K slot s is row (2p)*page_size + s and its V
        # slot is page_size rows later. view() (not reshape) so a non-contiguous pool fails loudly
        # instead of silently writing into a copy.
        rows = kv_layer.view(-1, kv_heads, head_dim)
        rows.index_copy_(0, self._write_rows[0], k.to(kv_layer.dtype))
        rows.index_copy_(0, self._write_rows[1], v.to(kv_layer.dtype))
        out = torch.empty_like(q)
        for plan in self._plans:
            q_len = plan.q_end - plan.q_start
            qs = q[plan.q_start : plan.q_end].transpose(0, 1)  # [heads, q_len, dim]
            ks = rows.index_select(0, plan.k_rows).transpose(0, 1).to(q.dtype)  # [kv_heads, kv_len, dim]
            vs = rows.index_select(0, plan.v_rows).transpose(0, 1).to(q.dtype)
            if q_len == plan.kv_len:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=q_len > 1, enable_gqa=True)
            else:
                # query head h = kv_head * group + member, so the fold is a plain reshape
                folded = qs.reshape(kv_heads, group * q_len, head_dim)
                o = F.scaled_dot_product_attention(folded, ks, vs, attn_mask=plan.mask)
                o = o.view(num_heads, q_len, head_dim)
            out[plan.q_start : plan.q_end] = o.transpose(0, 1)
        return out
