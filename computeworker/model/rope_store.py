"""RoPE on q and k plus the K/V write into the pool in one Triton kernel, for the CUDA graphs.

Inside a captured decode or extend step each layer ran three small kernels between the QKV projection and
attention: FlashInfer's RoPE (q and k in place) and two scatters of K/V into the pool (all rows, then row 0
again so that padding rows aimed at row 0's slot lose). On an H100 they took ~9 us of GPU time per layer
plus two extra kernel boundaries (bench/results/gpu_notes.md run 9). One program per token here:

    q[t]            <- rope(q[t], position[t])                      in place (attention reads it next)
    pool row K[t]   <- rope(k[t], position[t])                      rows[t, 0] of kv_layer.view(-1, H_kv, D)
    pool row V[t]   <- v[t]                                         rows[t, 1]

(For the split-KV extend attention the rotated q goes instead into C blocks of a buffer, one per KV
chunk: the copies cost one kernel nothing, a separate copy cost ~7 us per layer.)

RoPE is the NeoX form the fused forward uses (`cos_sin` [positions, D] float32: cos in the first half, sin
in the second; x1, x2 = halves of x; out = (x1 cos - x2 sin, x2 cos + x1 sin)), computed in float32 and
rounded once, as FlashInfer's kernel does. The graphs' padding contract is kept: padding rows aim at row
0's slots, and only token 0 writes those (so no second pass is needed). k itself is not written back: the
attention kernels read K from the pool.

`RADIXKV_FUSED_ROPE_STORE=0` turns the kernel off (the graphs then run the three kernels as before).
"""

from __future__ import annotations

import contextlib
import os

import torch

from computeworker.model.triton_pdl import gdc_functions, pdl_enabled

_KERNEL: object | None = None


def fused_rope_store_enabled(num_qo_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the graphs use the fused kernel: CUDA with Triton importable, head_dim / 2 a power of two,
    and not switched off by RADIXKV_FUSED_ROPE_STORE=0."""
    if os.environ.get("RADIXKV_FUSED_ROPE_STORE", "1") == "0":
        return False
    half = head_dim // 2
    if head_dim % 2 or half & (half - 1) or num_qo_heads < 1 or num_kv_heads < 1:
        return False
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def _kernel() -> object:
    import triton
    import triton.language as tl

    gdc_wait, gdc_launch_dependents = gdc_functions()

    @triton.jit
    def rope_store_kernel(
        q_ptr, k_ptr, v_ptr, stride_qt, stride_kt, stride_vt,
        pos_ptr, cos_sin_ptr, rows_ptr, kv_ptr, q_copies_ptr, stride_copy,
        HQ: tl.constexpr, HKV: tl.constexpr, HQ_P: tl.constexpr, HKV_P: tl.constexpr, HALF: tl.constexpr,
        NUM_COPIES: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:  # computeworker/model/triton_pdl.py: no memory access before the previous kernel is done
            gdc_wait()
            gdc_launch_dependents()
        t = tl.program_id(0)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        i = tl.arange(0, HALF)[None, :]
        cos = tl.load(cos_sin_ptr + pos * (2 * HALF) + i)
        sin = tl.load(cos_sin_ptr + pos * (2 * HALF) + HALF + i)
        hq = tl.arange(0, HQ_P)[:, None]
        q_mask = hq < HQ
        qp = q_ptr + t.to(tl.int64) * stride_qt + hq * (2 * HALF) + i
        x1 = tl.load(qp, mask=q_mask).to(tl.float32)
        x2 = tl.load(qp + HALF, mask=q_mask).to(tl.float32)
        r1 = (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty)
        r2 = (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty)
        if NUM_COPIES == 0:
            tl.store(qp, r1, mask=q_mask)
            tl.store(qp + HALF, r2, mask=q_mask)
        else:  # rotated q into each block of a contiguous [NUM_COPIES, rows, HQ, D] buffer, q untouched
            cp = q_copies_ptr + t.to(tl.int64) * (HQ * 2 * HALF) + hq * (2 * HALF) + i
            for c in tl.static_range(NUM_COPIES):
                tl.store(cp + c * stride_copy, r1, mask=q_mask)
                tl.store(cp + c * stride_copy + HALF, r2, mask=q_mask)
        k_row = tl.load(rows_ptr + 2 * t)
        v_row = tl.load(rows_ptr + 2 * t + 1)
        # Padding rows aim at row 0's slots: token 0 alone writes them.
        if (t == 0) | (k_row != tl.load(rows_ptr)):
            hk = tl.arange(0, HKV_P)[:, None]
            k_mask = hk < HKV
            kp = k_ptr + t.to(tl.int64) * stride_kt + hk * (2 * HALF) + i
            y1 = tl.load(kp, mask=k_mask).to(tl.float32)
            y2 = tl.load(kp + HALF, mask=k_mask).to(tl.float32)
            kd = kv_ptr + k_row * (HKV * 2 * HALF) + hk * (2 * HALF) + i
            tl.store(kd, (y1 * cos - y2 * sin).to(kv_ptr.dtype.element_ty), mask=k_mask)
            tl.store(kd + HALF, (y2 * cos + y1 * sin).to(kv_ptr.dtype.element_ty), mask=k_mask)
            d = tl.arange(0, 2 * HALF)[None, :]
            v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + hk * (2 * HALF) + d, mask=k_mask)
            tl.store(kv_ptr + v_row * (HKV * 2 * HALF) + hk * (2 * HALF) + d, v, mask=k_mask)

    return rope_store_kernel


def rope_and_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    rows: torch.Tensor,
    kv_layer: torch.Tensor,
    q_copies: torch.Tensor | None = None,
) -> None:
    """q [T, Hq, D], k / v [T, Hkv, D] (rows may be strided, heads and dims packed), positions [T] int,
    cos_sin [P, D] float32, rows [T, 2] int64 (K row, V row of kv_layer.view(-1, Hkv, D)), kv_layer
    contiguous. Rotates q in place and writes rotated K and V into the pool. With q_copies, a contiguous
    [C, R >= T, Hq, D] buffer (the split-KV attention's per-chunk q, computeworker.model.split_extend),
    the rotated q goes into rows [0, T) of each of its C blocks instead, and q is left as it was."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _kernel()
    t, hq, d = q.shape
    hkv = k.shape[1]
    if t == 0:
        return
    num_copies, stride_copy = 0, 0
    if q_copies is not None:
        if not q_copies.is_contiguous() or q_copies.dim() != 4 or q_copies.shape[1] < t:
            raise ValueError(f"q_copies must be a contiguous [C, >= {t}, Hq, D] buffer")
        if tuple(q_copies.shape[2:]) != (hq, d):
            raise ValueError(f"q_copies heads / dims {tuple(q_copies.shape[2:])} differ from q's ({hq}, {d})")
        num_copies, stride_copy = int(q_copies.shape[0]), int(q_copies.stride(0))
    pdl = pdl_enabled(q.device)
    # Triton launches on the thread's current device: make it the tensors' (a worker on cuda:1).
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _KERNEL[(t,)](  # type: ignore[index]
            q, k, v, q.stride(0), k.stride(0), v.stride(0),
            positions, cos_sin, rows, kv_layer, q if q_copies is None else q_copies, stride_copy,
            HQ=hq, HKV=hkv, HQ_P=1 << (hq - 1).bit_length(), HKV_P=1 << (hkv - 1).bit_length(),
            HALF=d // 2, NUM_COPIES=num_copies, PDL=pdl, num_warps=4, launch_pdl=pdl,
        )  # fmt: skip
