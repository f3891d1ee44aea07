"""The MLP of a short step (65-128 rows) in three Triton kernels instead of five launches.

A cached step over a long prefix runs ~100 new tokens (the 128-row bucket of the extend graphs). Its MLP
ran, per layer: cuBLAS gate_up GEMM, FlashInfer SiLU-and-mul, cuBLAS down GEMM (split-K, so a second,
reduction kernel), then the next layer's FlashInfer fused add + RMSNorm. At 128 rows every one of those is
short, and each kernel boundary costs the GPU a drain and a ramp. Here::

    act = silu(x @ Wg^T) * (x @ Wu^T)        gate_up_silu: one CTA computes 64 gate and the 64 matching
                                             up columns and writes only their product (no [M, 2I]
                                             intermediate, no separate SiLU kernel)
    partials[s] = act[:, Ks] @ Wd[:, Ks]^T   down_partials: split-K over S slices of the intermediate,
                                             fp32 partial sums, no reduction kernel
    x = residual + sum_s partials[s]         add_partials_rmsnorm: the reduction folded into the add +
    residual = x; out = rmsnorm(x) * w       RMSNorm the next layer (or the final norm) runs anyway

Rounding differs from the unfused path only where it gains precision: SiLU-and-mul reads fp32 GEMM
accumulators instead of bf16-rounded ones, and the down projection reaches the residual add unrounded.
The tile sizes were measured on an H200 (bench/splitk_gemm_bench.py; bench/results/gpu_notes.md run 63):
gate_up 64.3 us against cuBLAS's 65.9 us a layer, down 35.9 against 36.3 (cuBLAS's reduction included).

`fused_mlp_applies` says where it runs: CUDA sm90+ with Triton, 65-128 rows, bf16/fp16, and sizes that
divide the tiles. `RADIXKV_FUSED_MLP=0` turns it off.
"""

from __future__ import annotations

import os

import torch

from computeworker.model.triton_pdl import gdc_functions, pdl_enabled

MIN_ROWS, MAX_ROWS = 65, 128  # one 128-row tile; fewer rows are left to cuBLAS's small-M kernels
_BM = 128
_GATE_BN, _GATE_BK, _GATE_STAGES, _GATE_WARPS = 64, 64, 3, 8
_DOWN_BN, _DOWN_BK, _DOWN_SPLIT, _DOWN_STAGES, _DOWN_WARPS = 64, 128, 2, 4, 4
_kernels: dict[str, object] = {}


def fused_mlp_enabled() -> bool:
    """False when RADIXKV_FUSED_MLP=0, or Triton is missing."""
    if os.environ.get("RADIXKV_FUSED_MLP", "1") == "0":
        return False
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def fused_mlp_applies(num_rows: int, hidden: int, intermediate: int, x: torch.Tensor) -> bool:
    """Whether a step of `num_rows` rows with these sizes runs the fused MLP on x's device and dtype."""
    return (
        MIN_ROWS <= num_rows <= MAX_ROWS
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(x.device)[0] >= 9
        and hidden & (hidden - 1) == 0  # the norm kernel holds a whole row
        and hidden % _GATE_BK == 0
        and hidden % _DOWN_BN == 0
        and intermediate % _GATE_BN == 0
        and intermediate % (_DOWN_SPLIT * _DOWN_BK) == 0
    )


def _build() -> None:  # pragma: no cover - needs triton and a GPU
    import triton
    import triton.language as tl

    gdc_wait, gdc_launch_dependents = gdc_functions()

    @triton.jit
    def gate_up_silu_kernel(
        x_ptr, w_ptr, act_ptr, M, H, INTER, stride_xm, stride_wn, stride_am,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:  # nothing is read or written before the previous kernel has finished
            gdc_wait()
        pid_n = tl.program_id(0)
        offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        row_ok = offs_m < M
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        g_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        u_ptrs = g_ptrs + INTER.to(tl.int64) * stride_wn
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, H, BK):
            a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            acc_g = tl.dot(a, tl.trans(tl.load(g_ptrs)), acc_g)
            acc_u = tl.dot(a, tl.trans(tl.load(u_ptrs)), acc_u)
            x_ptrs += BK
            g_ptrs += BK
            u_ptrs += BK
        if PDL:
            gdc_launch_dependents()
        act = acc_g / (1.0 + tl.exp2(-1.4426950408889634 * acc_g)) * acc_u
        out = act_ptr + offs_m[:, None] * stride_am + offs_n[None, :]
        tl.store(out, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def down_partials_kernel(
        act_ptr, w_ptr, part_ptr, M, K, stride_am, stride_wn, stride_ps, stride_pm,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:
            gdc_wait()
        pid_n = tl.program_id(0)
        offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
        pid_s = tl.program_id(2)
        k_per = K // SPLIT
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = pid_s * k_per + tl.arange(0, BK)
        row_ok = offs_m < M
        a_ptrs = act_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, k_per, BK):
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            acc = tl.dot(a, tl.trans(tl.load(w_ptrs)), acc)
            a_ptrs += BK
            w_ptrs += BK
        if PDL:
            gdc_launch_dependents()
        out = part_ptr + pid_s * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :]
        tl.store(out, acc, mask=row_ok[:, None])

    @triton.jit
    def add_partials_rmsnorm_kernel(
        part_ptr, residual_ptr, weight_ptr, out_ptr, eps, stride_ps, stride_pm, stride_rm, stride_om,
        H: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        row = tl.program_id(0)
        cols = tl.arange(0, H)
        x = tl.load(residual_ptr + row * stride_rm + cols).to(tl.float32)
        for s in tl.static_range(SPLIT):
            x += tl.load(part_ptr + s * stride_ps + row * stride_pm + cols)
        tl.store(residual_ptr + row * stride_rm + cols, x.to(residual_ptr.dtype.element_ty))
        rrms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        w = tl.load(weight_ptr + cols).to(tl.float32)
        tl.store(out_ptr + row * stride_om + cols, (x * rrms * w).to(out_ptr.dtype.element_ty))

    _kernels.update(gate_up=gate_up_silu_kernel, down=down_partials_kernel, norm=add_partials_rmsnorm_kernel)


def _kernel(name: str) -> object:
    if not _kernels:
        _build()
    return _kernels[name]


def mlp_partials(x: torch.Tensor, gate_up_weight: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """The MLP of x [M, H] without its final reduction: fp32 partial sums [S, M, H] whose sum over S is
    silu(x Wg^T) * (x Wu^T) Wd^T (gate_up_weight [2I, H] = [Wg; Wu], down_weight [H, I]). Needs
    `fused_mlp_applies`; all operands contiguous on one device."""
    num_rows, hidden = x.shape
    intermediate = down_weight.shape[1]
    if gate_up_weight.shape != (2 * intermediate, hidden) or down_weight.shape != (hidden, intermediate):
        raise ValueError(
            f"weights {tuple(gate_up_weight.shape)} / {tuple(down_weight.shape)} do not fit x {tuple(x.shape)}"
        )
    if not (x.is_contiguous() and gate_up_weight.is_contiguous() and down_weight.is_contiguous()):
        raise ValueError("the fused MLP needs contiguous operands")
    act = torch.empty(num_rows, intermediate, dtype=x.dtype, device=x.device)
    partials = torch.empty(_DOWN_SPLIT, num_rows, hidden, dtype=torch.float32, device=x.device)
    m_tiles = (num_rows + _BM - 1) // _BM
    pdl = pdl_enabled(x.device)
    with torch.cuda.device(x.device):
        _kernel("gate_up")[(intermediate // _GATE_BN, m_tiles)](  # type: ignore[index]
            x, gate_up_weight, act, num_rows, hidden, intermediate, x.stride(0), gate_up_weight.stride(0),
            act.stride(0), BM=_BM, BN=_GATE_BN, BK=_GATE_BK, PDL=pdl, num_stages=_GATE_STAGES,
            num_warps=_GATE_WARPS, launch_pdl=pdl,
        )  # fmt: skip
        _kernel("down")[(hidden // _DOWN_BN, m_tiles, _DOWN_SPLIT)](  # type: ignore[index]
            act, down_weight, partials, num_rows, intermediate, act.stride(0), down_weight.stride(0),
            partials.stride(0), partials.stride(1), BM=_BM, BN=_DOWN_BN, BK=_DOWN_BK, SPLIT=_DOWN_SPLIT,
            PDL=pdl, num_stages=_DOWN_STAGES, num_warps=_DOWN_WARPS, launch_pdl=pdl,
        )  # fmt: skip
    return partials


def add_partials_rmsnorm(
    partials: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += partials.sum(0) (in place, summed in fp32); returns rmsnorm(residual) * weight, computed
    from the unrounded sum as FlashInfer's fused_add_rmsnorm does."""
    split, num_rows, hidden = partials.shape
    if residual.shape != (num_rows, hidden) or weight.shape != (hidden,):
        raise ValueError(f"residual {tuple(residual.shape)} / weight {tuple(weight.shape)} do not fit")
    if hidden & (hidden - 1) or residual.stride(1) != 1 or not partials.is_contiguous():
        raise ValueError("add_partials_rmsnorm needs a power-of-two hidden size and packed rows")
    out = torch.empty_like(residual)
    pdl = pdl_enabled(residual.device)
    with torch.cuda.device(residual.device):
        _kernel("norm")[(num_rows,)](  # type: ignore[index]
            partials, residual, weight, out, eps, partials.stride(0), partials.stride(1), residual.stride(0),
            out.stride(0), H=hidden, SPLIT=split, PDL=pdl, num_warps=8 if hidden >= 4096 else 4, launch_pdl=pdl,
        )  # fmt: skip
    return out
