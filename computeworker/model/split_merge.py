"""Merging partial attention results by their log-sum-exp (the second half of split_plan's scheme).

Each real query row has one causal "tail" result and `num_chunks` prefix-chunk results, each an output
vector o_i and a base-2 log-sum-exp l_i (FlashInfer's convention: l = log2(sum_j 2^(s_j)), s the scaled
scores in log2 units). Attention over the union of their keys is

    m = max_i l_i,   w_i = 2^(l_i - m),   o = sum_i w_i o_i / sum_i w_i

A chunk with no keys comes with l = -inf (weight 0); the tail always has keys (a row sees itself). Rows at
or past `num_rows_real` (padding) are written as zeros. One Triton program per (row, block of heads),
reading the chunk results where the chunk call left them and writing the attention output buffer
directly: one launch per layer. `merge_partial_states_reference` is the same computation in PyTorch.
"""

from __future__ import annotations

import torch

from computeworker.model.triton_pdl import gdc_functions, pdl_enabled

_kernel: object | None = None


def merge_partial_states_reference(
    chunk_out: torch.Tensor,
    chunk_lse: torch.Tensor,
    tail_out: torch.Tensor,
    tail_lse: torch.Tensor,
    num_rows_real: int,
) -> torch.Tensor:
    """chunk_out [C, R, H, D], chunk_lse [C, R, H] (log2), tail_out [R, H, D], tail_lse [R, H] ->
    merged [R, H, D] in tail_out's dtype, rows >= num_rows_real zero."""
    acc = torch.promote_types(tail_out.dtype, torch.float32)  # float32, or float64 for float64 inputs
    lse = torch.cat((tail_lse[None].to(acc), chunk_lse.to(acc)), dim=0)  # [C + 1, R, H]
    weights = torch.exp2(lse - lse.max(dim=0, keepdim=True).values)
    outs = torch.cat((tail_out[None].to(acc), chunk_out.to(acc)), dim=0)
    merged = (weights[..., None] * outs).sum(dim=0) / weights.sum(dim=0)[..., None]
    merged[num_rows_real:] = 0
    return merged.to(tail_out.dtype)


def _build_kernel() -> object:  # pragma: no cover - needs triton and a GPU
    import triton
    import triton.language as tl

    gdc_wait, gdc_launch_dependents = gdc_functions()

    @triton.jit
    def merge_kernel(
        chunk_out, chunk_lse, tail_out, tail_lse, num_real_ptr, out, out_row_stride,
        NUM_ROWS: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        NUM_CHUNKS: tl.constexpr, BLOCK_HEADS: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:  # computeworker/model/triton_pdl.py: no memory access before the attention is done
            gdc_wait()
            gdc_launch_dependents()
        row = tl.program_id(0)
        heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        vec = heads[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        dest = out + row.to(tl.int64) * out_row_stride + vec
        if row >= tl.load(num_real_ptr):
            tl.store(dest, tl.zeros((BLOCK_HEADS, HEAD_DIM), tl.float32).to(out.dtype.element_ty))
        else:
            m = tl.load(tail_lse + row * NUM_HEADS + heads)
            acc = tl.load(tail_out + row * NUM_HEADS * HEAD_DIM + vec).to(tl.float32)
            total = tl.full((BLOCK_HEADS,), 1.0, tl.float32)
            for c in tl.static_range(NUM_CHUNKS):
                at = c * NUM_ROWS + row
                lse = tl.load(chunk_lse + at * NUM_HEADS + heads)
                m_new = tl.maximum(m, lse)
                scale_old = tl.exp2(m - m_new)
                scale_new = tl.exp2(lse - m_new)  # 0 for an empty chunk (lse = -inf)
                o = tl.load(chunk_out + at.to(tl.int64) * NUM_HEADS * HEAD_DIM + vec).to(tl.float32)
                acc = acc * scale_old[:, None] + o * scale_new[:, None]
                total = total * scale_old + scale_new
                m = m_new
            tl.store(dest, (acc / total[:, None]).to(out.dtype.element_ty))

    return merge_kernel


def merge_partial_states(
    chunk_out: torch.Tensor,
    chunk_lse: torch.Tensor,
    tail_out: torch.Tensor,
    tail_lse: torch.Tensor,
    num_rows_real: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """The Triton merge (CUDA tensors; shapes as in the reference, all contiguous but out's row stride;
    num_rows_real a one-element int32 device tensor, so a captured graph reads each step's value).
    Writes and returns `out` [R, H, D]."""
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    num_chunks, num_rows, num_heads, head_dim = chunk_out.shape
    if tuple(tail_out.shape) != (num_rows, num_heads, head_dim) or out.shape != tail_out.shape:
        raise ValueError(f"shapes differ: chunks {tuple(chunk_out.shape)}, tail {tuple(tail_out.shape)}")
    if not (chunk_out.is_contiguous() and chunk_lse.is_contiguous() and tail_out.is_contiguous()):
        raise ValueError("the partial results must be contiguous")
    if out.stride(1) != head_dim or out.stride(2) != 1:
        raise ValueError("out's heads and dims must be packed")
    block_heads = next(b for b in (8, 4, 2, 1) if num_heads % b == 0)
    pdl = pdl_enabled(out.device)
    with torch.cuda.device(out.device):
        _kernel[(num_rows, num_heads // block_heads)](  # type: ignore[index]
            chunk_out, chunk_lse, tail_out, tail_lse, num_rows_real, out, out.stride(0),
            NUM_ROWS=num_rows, NUM_HEADS=num_heads, HEAD_DIM=head_dim,
            NUM_CHUNKS=num_chunks, BLOCK_HEADS=block_heads, PDL=pdl, launch_pdl=pdl,
        )  # fmt: skip
    return out
