"""Split-KV paged attention in Triton for small prefills over long cached prefixes (extend graphs).

The case: 100 new tokens over a 10k-token cached prefix. FlashInfer's fa2 kernel splits the KV but runs
on mma.sync (~245 TFLOP/s on an H100); fa3 runs on wgmma but gives a (query tile, head) one CTA and
never splits the KV, so 100 rows keep 32 of 132 SMs busy. Splitting fa3 by hand needs two host plans per
step (~1 ms; run 23 in bench/results/gpu_notes.md). This kernel splits the KV itself, on the GPU, with
no plan beyond copying a few dozen integers: a drop-in for FlashInfer's CUDA-graph prefill wrapper
(same `plan` arguments, `run(q, kv_layer, out=)`), used by `ExtendGraphs` for its smallest bucket.

    grid  (query tile, KV head, split)      a tile = BLOCK_T tokens x the GQA group's query heads
    split s of a tile's visible keys        ceil(keys / NUM_SPLITS) rounded up to BLOCK_N, on the GPU
    partial kernel                          online softmax over the split -> O_s (bf16), LSE_s (fp32)
    merge kernel                            O = sum_s exp2(LSE_s - LSE) O_s, one program per token

Causal masking is bottom-right aligned as FlashInfer's: a sequence's q_len new tokens are the last
q_len of its kv_len, and token i (0-based among the new ones) sees keys 0 .. kv_len - q_len + i.
Pool layout (FlashInfer NHD): kv_layer [pages, 2, page_size, kv_heads, head_dim].

Graph contract: every buffer the kernels read (page ids, the per-sequence and per-tile table) is a
static device tensor rewritten by `plan`, the grid is fixed at construction, so a captured graph
replays correctly for any batch within (max_seqs, max_tokens, max_pages). Rows of `out` past the
batch's tokens are not written (as with FlashInfer: they keep earlier values).

`plan_tables` (pure Python) is importable without Triton; the kernels need Triton and a CUDA device.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

SEQ_FIELDS = 4  # q_start, q_len, kv_len, first page index into the page-id buffer
TILE_FIELDS = 2  # sequence (-1: unused tile), first token


@dataclass(frozen=True, slots=True)
class TritonPrefillConfig:
    """Launch shape. block_tokens x GQA group = rows per tile (a power of two); block_keys keys per inner
    step (a multiple of the page size); num_splits KV splits per tile."""

    block_tokens: int = 16
    block_keys: int = 64
    num_splits: int = 8
    num_warps: int = 4
    num_stages: int = 3


def max_tiles(max_tokens: int, max_seqs: int, block_tokens: int) -> int:
    """Tiles a batch of at most max_seqs sequences and max_tokens new tokens can need: every sequence
    but one may waste a partial tile."""
    return -(-max_tokens // block_tokens) + max_seqs - 1


def plan_tables(
    q_lens: list[int] | tuple[int, ...],
    kv_lens: list[int] | tuple[int, ...],
    page_size: int,
    *,
    max_seqs: int,
    max_tokens: int,
    block_tokens: int,
) -> np.ndarray:
    """The int32 table the kernels read: [total tokens, per sequence (q_start, q_len, kv_len, first page)
    x max_seqs, per tile (sequence, first token) x max_tiles]; unused sequences are zeros, unused tiles
    (-1, 0). Raises ValueError for a batch the launch shape can't hold or inconsistent lengths."""
    if len(q_lens) != len(kv_lens) or not 1 <= len(q_lens) <= max_seqs:
        raise ValueError(
            f"need 1..{max_seqs} sequences with a kv_len each, got {len(q_lens)}, {len(kv_lens)}"
        )
    if any(q < 1 or kv < q for q, kv in zip(q_lens, kv_lens, strict=True)):
        raise ValueError(f"every sequence needs 1 <= q_len <= kv_len, got {q_lens}, {kv_lens}")
    if sum(q_lens) > max_tokens:
        raise ValueError(f"{sum(q_lens)} new tokens exceed the {max_tokens} this launch shape holds")
    n_tiles = max_tiles(max_tokens, max_seqs, block_tokens)
    table = np.zeros(1 + SEQ_FIELDS * max_seqs + TILE_FIELDS * n_tiles, dtype=np.int32)
    tiles = table[1 + SEQ_FIELDS * max_seqs :].reshape(n_tiles, TILE_FIELDS)
    tiles[:, 0] = -1
    q_start = page_start = tile = 0
    for seq, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens, strict=True)):
        table[1 + SEQ_FIELDS * seq : 1 + SEQ_FIELDS * (seq + 1)] = (q_start, q_len, kv_len, page_start)
        for first in range(q_start, q_start + q_len, block_tokens):
            tiles[tile] = (seq, first)
            tile += 1
        q_start += q_len
        page_start += -(-kv_len // page_size)
    table[0] = q_start
    return table


def supports(num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, block_keys: int) -> bool:
    """Whether the kernels handle this shape: power-of-two GQA group, query heads and head_dim (Triton
    ranges), and whole pages per key block."""

    def pow2(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    return (
        num_qo_heads % num_kv_heads == 0
        and pow2(num_qo_heads // num_kv_heads)
        and pow2(num_qo_heads)
        and pow2(head_dim)
        and head_dim >= 16
        and block_keys % page_size == 0
    )


def _kernels() -> tuple:
    """The two Triton JIT kernels, defined on first use so CPU imports need no Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(
        q_ptr, stride_qt, stride_qh,
        kv_ptr, stride_page, stride_kind, stride_slot, stride_head,
        page_ids_ptr, table_ptr, o_part_ptr, lse_part_ptr,
        max_tokens, sm_scale_log2,
        MAX_SEQS: tl.constexpr, GROUP: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        hkv = tl.program_id(1)
        split = tl.program_id(2)
        tile_entry = table_ptr + 1 + 4 * MAX_SEQS + 2 * tile
        seq = tl.load(tile_entry)
        if seq < 0:
            return
        tok0 = tl.load(tile_entry + 1)
        seq_entry = table_ptr + 1 + 4 * seq
        q_start = tl.load(seq_entry)
        q_len = tl.load(seq_entry + 1)
        kv_len = tl.load(seq_entry + 2)
        page_start = tl.load(seq_entry + 3)
        q_end = q_start + q_len
        BLOCK_M: tl.constexpr = BLOCK_T * GROUP
        r = tl.arange(0, BLOCK_M)
        tok = tok0 + r // GROUP
        head = hkv * GROUP + r % GROUP
        row_ok = tok < q_end
        pos = kv_len - q_len + (tok - q_start)  # the last key this row sees
        last_tok = tl.minimum(tok0 + BLOCK_T, q_end) - 1
        n_keys = kv_len - q_len + (last_tok - q_start) + 1
        per_split = tl.cdiv(tl.cdiv(n_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, n_keys)
        d = tl.arange(0, D)
        q = tl.load(
            q_ptr + tok[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        k_base = kv_ptr + hkv * stride_head
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            page = tl.load(page_ids_ptr + page_start + n // PAGE, mask=n_ok, other=0)
            offs = page.to(tl.int64) * stride_page + (n % PAGE) * stride_slot
            k = tl.load(k_base + offs[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(k_base + stride_kind + offs[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * sm_scale_log2
            s = tl.where((n[None, :] <= pos[:, None]) & n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        part_row = (split * max_tokens + tok).to(tl.int64) * HQ + head
        tl.store(
            o_part_ptr + part_row[:, None] * D + d[None, :],
            o.to(o_part_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )
        tl.store(lse_part_ptr + part_row, lse, mask=row_ok)

    @triton.jit
    def merge_kernel(
        o_part_ptr, lse_part_ptr, out_ptr, stride_ot, stride_oh, table_ptr, max_tokens,
        HQ: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        if t >= tl.load(table_ptr):
            return
        h = tl.arange(0, HQ)
        d = tl.arange(0, D)
        m = tl.full([HQ], float("-inf"), tl.float32)
        l_sum = tl.zeros([HQ], tl.float32)
        acc = tl.zeros([HQ, D], tl.float32)
        for s in tl.static_range(NUM_SPLITS):
            row = (s * max_tokens + t).to(tl.int64) * HQ + h
            lse = tl.load(lse_part_ptr + row)
            o = tl.load(o_part_ptr + row[:, None] * D + d[None, :]).to(tl.float32)
            m_new = tl.maximum(m, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            a = tl.exp2(m - m_safe)
            b = tl.exp2(lse - m_safe)
            acc = acc * a[:, None] + o * b[:, None]
            l_sum = l_sum * a + b
            m = m_new
        out = acc / l_sum[:, None]
        tl.store(
            out_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty)
        )

    return partial_kernel, merge_kernel


_KERNELS: tuple | None = None


class TritonPagedPrefill:
    """Causal paged prefill over a fixed launch shape, planned like FlashInfer's CUDA-graph wrapper.

    State: static device buffers (page ids, the plan table, the partial outputs) sized for max_seqs
    sequences, max_tokens new tokens and max_pages pages; `plan` rewrites them (host -> device copies
    on the current stream), `run` launches two kernels that read them. Not thread-safe."""

    def __init__(
        self,
        *,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        max_seqs: int,
        max_tokens: int,
        max_pages: int,
        device: torch.device | str,
        dtype: torch.dtype = torch.bfloat16,
        config: TritonPrefillConfig | None = None,
    ) -> None:
        cfg = config or TritonPrefillConfig()
        if not supports(num_qo_heads, num_kv_heads, head_dim, page_size, cfg.block_keys):
            raise ValueError(
                f"Triton prefill needs power-of-two heads / group / head_dim and block_keys a multiple of the"
                f" page size: got {num_qo_heads} q heads, {num_kv_heads} kv heads, head_dim {head_dim},"
                f" page {page_size}, block_keys {cfg.block_keys}"
            )
        self.cfg = cfg
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.page_size = page_size
        self.max_seqs, self.max_tokens, self.max_pages = max_seqs, max_tokens, max_pages
        self.device = torch.device(device)
        self.num_tiles = max_tiles(max_tokens, max_seqs, cfg.block_tokens)
        table_len = 1 + SEQ_FIELDS * max_seqs + TILE_FIELDS * self.num_tiles
        self.table = torch.zeros(table_len, dtype=torch.int32, device=self.device)
        self._table_host = torch.zeros(table_len, dtype=torch.int32)
        if self.device.type == "cuda":
            self._table_host = self._table_host.pin_memory()
        self.page_ids = torch.zeros(max_pages, dtype=torch.int32, device=self.device)
        self.o_part = torch.zeros(
            (cfg.num_splits, max_tokens, num_qo_heads, head_dim), dtype=dtype, device=self.device
        )
        self.lse_part = torch.zeros(
            (cfg.num_splits, max_tokens, num_qo_heads), dtype=torch.float32, device=self.device
        )
        self.sm_scale = head_dim**-0.5

    @property
    def launch_key(self) -> tuple[int, ...]:
        """Fixed at construction: a captured graph is valid for every plan."""
        return (self.num_tiles, self.num_kv_heads, self.cfg.num_splits, self.max_tokens)

    def plan(
        self,
        qo_indptr: torch.Tensor,
        kv_indptr: torch.Tensor,
        page_ids: torch.Tensor,
        last_page_len: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        *,
        causal: bool = True,
        sm_scale: float | None = None,
        **_dtypes: object,
    ) -> None:
        """FlashInfer's plan arguments (host int32 indptrs, page ids on any device). Only causal attention
        with this object's shape; raises ValueError otherwise."""
        if not causal or (num_qo_heads, num_kv_heads, head_dim, page_size) != (
            self.num_qo_heads, self.num_kv_heads, self.head_dim, self.page_size,
        ):  # fmt: skip
            raise ValueError("plan() must be causal and use the shape this object was built for")
        qo = qo_indptr.tolist()
        pages = kv_indptr.tolist()
        last = last_page_len.tolist()
        q_lens = [b - a for a, b in itertools.pairwise(qo)]
        kv_lens = [
            (b - a - 1) * page_size + x for (a, b), x in zip(itertools.pairwise(pages), last, strict=True)
        ]
        if pages[-1] > self.max_pages:
            raise ValueError(f"{pages[-1]} pages exceed the {self.max_pages} this object holds")
        table = plan_tables(
            q_lens, kv_lens, page_size,
            max_seqs=self.max_seqs, max_tokens=self.max_tokens, block_tokens=self.cfg.block_tokens,
        )  # fmt: skip
        if sm_scale is not None:
            self.sm_scale = sm_scale
        self._table_host.numpy()[:] = table
        self.table.copy_(self._table_host, non_blocking=True)
        self.page_ids[: pages[-1]].copy_(page_ids[: pages[-1]], non_blocking=True)

    def run(
        self, q: torch.Tensor, kv_layer: torch.Tensor, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q [rows >= planned tokens, q heads, head_dim] (rows may be strided; heads and dims packed),
        kv_layer [pages, 2, page_size, kv heads, head_dim]; writes and returns out [rows, heads, dim]."""
        global _KERNELS
        if _KERNELS is None:
            _KERNELS = _kernels()
        partial_kernel, merge_kernel = _KERNELS
        if out is None:
            out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        cfg = self.cfg
        group = self.num_qo_heads // self.num_kv_heads
        log2e = 1.4426950408889634
        partial_kernel[(self.num_tiles, self.num_kv_heads, cfg.num_splits)](
            q, q.stride(0), q.stride(1),
            kv_layer, kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2), kv_layer.stride(3),
            self.page_ids, self.table, self.o_part, self.lse_part,
            self.max_tokens, self.sm_scale * log2e,
            MAX_SEQS=self.max_seqs, GROUP=group, HQ=self.num_qo_heads, D=self.head_dim, PAGE=self.page_size,
            BLOCK_T=cfg.block_tokens, BLOCK_N=cfg.block_keys, NUM_SPLITS=cfg.num_splits,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        merge_kernel[(self.max_tokens,)](
            self.o_part, self.lse_part, out, out.stride(0), out.stride(1), self.table, self.max_tokens,
            HQ=self.num_qo_heads, D=self.head_dim, NUM_SPLITS=cfg.num_splits, num_warps=4,
        )  # fmt: skip
        return out
