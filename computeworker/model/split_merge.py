"""Merging partial attention results by their log-sum-exp (the second half of split_plan's scheme).

Each query row has one causal "tail" result and `num_chunks` prefix-chunk results, each an output
vector o_i and a log2-sum-exp l_i (FlashInfer's convention: l = log2(sum_j 2^(s_j))). Attention over
the union of their keys is

    m = max_i l_i,   w_i = 2^(l_i - m),   o = sum_i w_i o_i / sum_i w_i

Chunks marked invalid (split_plan's chunk_valid, looked up through the row's sequence) get weight 0.
One Triton kernel does it for every row and head, reading the chunk results where the chunk call left
them (row c * num_rows + r) and writing the attention output buffer directly: one launch per layer.
`merge_split_states_reference` is the same computation in PyTorch, for tests and CPU checks.
"""

from __future__ import annotations

import torch


def merge_split_states_reference(
    tail_out: torch.Tensor,
    tail_lse: torch.Tensor,
    chunk_out: torch.Tensor,
    chunk_lse: torch.Tensor,
    row_seq: torch.Tensor,
    chunk_valid: torch.Tensor,
) -> torch.Tensor:
    """tail_out [R, H, D], tail_lse [R, H], chunk_out [C, R, H, D], chunk_lse [C, R, H] (log2),
    row_seq [R] int, chunk_valid [C, B + 1] int -> merged [R, H, D] in tail_out's dtype."""
    acc = torch.promote_types(tail_out.dtype, torch.float32)  # float32, or float64 for float64 inputs
    valid = chunk_valid[:, row_seq.long()].bool()  # [C, R]
    lse = torch.cat((tail_lse[None].to(acc), chunk_lse.to(acc)), dim=0)  # [C + 1, R, H]
    keep = torch.cat((torch.ones_like(valid[:1]), valid), dim=0)[:, :, None]
    lse = torch.where(keep, lse, torch.full_like(lse, float("-inf")))
    weights = torch.exp2(lse - lse.max(dim=0, keepdim=True).values)  # [C + 1, R, H]
    outs = torch.cat((tail_out[None].to(acc), chunk_out.to(acc)), dim=0)
    merged = (weights[..., None] * outs).sum(dim=0) / weights.sum(dim=0)[..., None]
    return merged.to(tail_out.dtype)


_kernel = None


def _build_kernel():  # pragma: no cover - needs triton and a GPU
    import triton
    import triton.language as tl

    @triton.jit
    def merge_kernel(
        tail_out,
        tail_lse,
        chunk_out,
        chunk_lse,
        row_seq,
        chunk_valid,
        out,
        num_rows,
        tail_row_stride,
        out_row_stride,
        NUM_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        NUM_CHUNKS: tl.constexpr,
        VALID_STRIDE: tl.constexpr,
        BLOCK_HEADS: tl.constexpr,
    ):
        row = tl.program_id(0)
        heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        dims = tl.arange(0, HEAD_DIM)
        vec = heads[:, None] * HEAD_DIM + dims[None, :]
        seq = tl.load(row_seq + row)
        m = tl.load(tail_lse + row * NUM_HEADS + heads)
        acc = tl.load(tail_out + row * tail_row_stride + vec).to(tl.float32)
        total = tl.full((BLOCK_HEADS,), 1.0, tl.float32)
        for c in tl.static_range(NUM_CHUNKS):
            valid = tl.load(chunk_valid + c * VALID_STRIDE + seq)
            lse = tl.load(chunk_lse + (c * num_rows + row) * NUM_HEADS + heads)
            lse = tl.where(valid != 0, lse, float("-inf"))
            m_new = tl.maximum(m, lse)
            scale_old = tl.exp2(m - m_new)
            scale_new = tl.exp2(lse - m_new)
            o = tl.load(chunk_out + (c * num_rows + row) * NUM_HEADS * HEAD_DIM + vec).to(tl.float32)
            acc = acc * scale_old[:, None] + o * scale_new[:, None]
            total = total * scale_old + scale_new
            m = m_new
        result = acc / total[:, None]
        tl.store(out + row * out_row_stride + vec, result.to(out.dtype.element_ty))

    return merge_kernel


def merge_split_states(
    tail_out: torch.Tensor,
    tail_lse: torch.Tensor,
    chunk_out: torch.Tensor,
    chunk_lse: torch.Tensor,
    row_seq: torch.Tensor,
    chunk_valid: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """The Triton merge (CUDA tensors; shapes as in the reference, all but the row stride of tail_out
    and out contiguous). Writes and returns `out` [R, H, D]."""
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    num_chunks, num_rows, num_heads, head_dim = chunk_out.shape
    if tail_out.shape != (num_rows, num_heads, head_dim) or out.shape != tail_out.shape:
        raise ValueError(f"shapes differ: tail {tuple(tail_out.shape)}, out {tuple(out.shape)}")
    if chunk_valid.shape[0] != num_chunks or row_seq.shape != (num_rows,):
        raise ValueError("chunk_valid must be [num_chunks, batch + 1] and row_seq [num_rows]")
    block_heads = min(num_heads, 8)
    if num_heads % block_heads:
        block_heads = 1
    grid = (num_rows, num_heads // block_heads)
    _kernel[grid](
        tail_out,
        tail_lse,
        chunk_out,
        chunk_lse,
        row_seq,
        chunk_valid,
        out,
        num_rows,
        tail_out.stride(0),
        out.stride(0),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        NUM_CHUNKS=num_chunks,
        VALID_STRIDE=int(chunk_valid.shape[1]),
        BLOCK_HEADS=block_heads,
    )
    return out
