"""The MLP of a short step (65-128 rows) in three Triton kernels instead of five launches.

A cached step over a long prefix runs ~100 new tokens (the 128-row bucket of the extend graphs). Its MLP
ran, per layer: cuBLAS gate_up GEMM, FlashInfer SiLU-and-mul, cuBLAS down GEMM (split-K, so a second,
reduction kernel), then the next layer's FlashInfer fused add + RMSNorm. At 128 rows every one of those is
short, and each kernel boundary costs the GPU a drain and a ramp. Here::

    act = silu(x @ Wg^T) * (x @ Wu^T)        gate_up_silu: one CTA computes 64 gate and the 64 matching
                                             up columns and writes only their product (no [M, 2I]
                                             intermediate, no separate SiLU kernel)
    partials[s] = act[:, Ks] @ Wd[:, Ks]^T   linear_partials: split-K over S slices of the intermediate,
                                             fp32 partial sums, no reduction kernel
    x = residual + sum_s partials[s]         add_partials_rmsnorm: the reduction folded into the add +
    residual = x; out = rmsnorm(x) * w       RMSNorm the next layer (or the final norm) runs anyway

Rounding differs from the unfused path only where it gains precision: SiLU-and-mul reads fp32 GEMM
accumulators instead of bf16-rounded ones, and the down projection reaches the residual add unrounded.
The tiles (`ShortStepTiles`) were measured on H200s (bench/fused_mlp_bench.py, bench/splitk_gemm_bench.py;
bench/results/gpu_notes.md runs 63 and 71): gate_up + SiLU with TMA loads (tensor descriptors) 65.9 us a
layer against 69.5 with pointer loads and 80.5 for cuBLAS + torch's SiLU-and-mul; down 35.9 against
cuBLAS's 36.3 (its reduction included).

`fused_mlp_applies` says where it runs: CUDA sm90+ with Triton, 65-128 rows, bf16/fp16, and sizes that
divide the tiles. `RADIXKV_FUSED_MLP=0` turns it off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from computeworker.model.triton_pdl import gdc_functions, pdl_enabled

MIN_ROWS, MAX_ROWS = 65, 128  # one 128-row tile; fewer rows are left to cuBLAS's small-M kernels
_BM = 128


@dataclass(frozen=True)
class GemmTiles:
    """One Triton GEMM launch: `bn` output columns per CTA (gate_up: `bn` gate columns and the `bn` matching
    up columns), `bk` of K per step, K cut into `split` slices with one fp32 partial sum each (split-K;
    gate_up takes 1), `stages` of software pipelining, `warps` per CTA, TMA (tensor descriptor) or pointer
    loads, and Triton's warp specialization of the main loop (TMA only)."""

    bn: int = 64
    bk: int = 64
    split: int = 1
    stages: int = 3
    warps: int = 8
    tma: bool = False
    warp_specialize: bool = False

    def fits(self, n: int, k: int) -> bool:
        """Whether an [M, K] x [N, K]^T GEMM is a whole number of tiles and K steps per slice."""
        return n % self.bn == 0 and k % (self.split * self.bk) == 0


@dataclass(frozen=True)
class ShortStepTiles:
    """The fused MLP's launches: gate_up + SiLU and the down projection (bench/fused_mlp_bench.py sweeps
    them; bench/results/gpu_notes.md has the figures)."""

    gate_up: GemmTiles = GemmTiles(tma=True)
    down: GemmTiles = GemmTiles(bk=128, split=2, stages=4, warps=4)


TILES = ShortStepTiles()
_kernels: dict[str, object] = {}


def fused_mlp_enabled() -> bool:
    """False when RADIXKV_FUSED_MLP=0, or Triton is missing."""
    if os.environ.get("RADIXKV_FUSED_MLP", "1") == "0":
        return False
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def fused_mlp_applies(
    num_rows: int, hidden: int, intermediate: int, x: torch.Tensor, tiles: ShortStepTiles = TILES
) -> bool:
    """Whether a step of `num_rows` rows with these sizes runs the fused MLP on x's device and dtype."""
    return (
        MIN_ROWS <= num_rows <= MAX_ROWS
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(x.device)[0] >= 9
        and hidden & (hidden - 1) == 0  # the norm kernel holds a whole row
        and tiles.gate_up.fits(intermediate, hidden)
        and tiles.gate_up.split == 1
        and tiles.down.fits(hidden, intermediate)
    )


def _build() -> None:  # pragma: no cover - needs triton and a GPU
    import triton
    import triton.language as tl

    gdc_wait, gdc_launch_dependents = gdc_functions()

    @triton.jit
    def silu_mul_store(acc_g, acc_u, act_ptr, offs_m, offs_n, row_ok, stride_am):
        act = acc_g / (1.0 + tl.exp2(-1.4426950408889634 * acc_g)) * acc_u
        out = act_ptr + offs_m[:, None] * stride_am + offs_n[None, :]
        tl.store(out, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None])

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
        silu_mul_store(acc_g, acc_u, act_ptr, offs_m, offs_n, row_ok, stride_am)

    @triton.jit
    def gate_up_silu_tma_kernel(
        x_desc, w_desc, act_ptr, M, H, INTER, stride_am,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr, WS: tl.constexpr,
    ):  # fmt: skip
        if PDL:
            gdc_wait()
        pid_n = tl.program_id(0)
        m0 = tl.program_id(1) * BM
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(0, H, BK, warp_specialize=WS):
            a = x_desc.load([m0, k])
            acc_g = tl.dot(a, w_desc.load([pid_n * BN, k]).T, acc_g)
            acc_u = tl.dot(a, w_desc.load([INTER + pid_n * BN, k]).T, acc_u)
        if PDL:
            gdc_launch_dependents()
        offs_m = m0 + tl.arange(0, BM)
        silu_mul_store(acc_g, acc_u, act_ptr, offs_m, pid_n * BN + tl.arange(0, BN), offs_m < M, stride_am)

    @triton.jit
    def linear_partials_kernel(
        x_ptr, w_ptr, part_ptr, M, K, stride_xm, stride_wn, stride_ps, stride_pm,
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
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, k_per, BK):
            a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            acc = tl.dot(a, tl.trans(tl.load(w_ptrs)), acc)
            x_ptrs += BK
            w_ptrs += BK
        if PDL:
            gdc_launch_dependents()
        out = part_ptr + pid_s * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :]
        tl.store(out, acc, mask=row_ok[:, None])

    @triton.jit
    def linear_partials_tma_kernel(
        x_desc, w_desc, part_ptr, M, K, stride_ps, stride_pm,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
        WS: tl.constexpr,
    ):  # fmt: skip
        if PDL:
            gdc_wait()
        pid_n = tl.program_id(0)
        m0 = tl.program_id(1) * BM
        pid_s = tl.program_id(2)
        k_per = K // SPLIT
        k0 = pid_s * k_per
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(0, k_per, BK, warp_specialize=WS):
            acc = tl.dot(x_desc.load([m0, k0 + k]), w_desc.load([pid_n * BN, k0 + k]).T, acc)
        if PDL:
            gdc_launch_dependents()
        offs_m = m0 + tl.arange(0, BM)
        out = (
            part_ptr
            + pid_s * stride_ps
            + offs_m[:, None] * stride_pm
            + pid_n * BN
            + tl.arange(0, BN)[None, :]
        )
        tl.store(out, acc, mask=(offs_m < M)[:, None])

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

    _kernels.update(
        gate_up=gate_up_silu_kernel,
        gate_up_tma=gate_up_silu_tma_kernel,
        partials=linear_partials_kernel,
        partials_tma=linear_partials_tma_kernel,
        norm=add_partials_rmsnorm_kernel,
    )


def _kernel(name: str) -> object:
    if not _kernels:
        _build()
    return _kernels[name]


def _descriptor(t: torch.Tensor, block: list[int], warp_specialize: bool) -> object:
    """A host-side TMA descriptor of `t` in `block` tiles (passed by value: valid inside CUDA graphs)."""
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    if warp_specialize and not getattr(_descriptor, "allocator_set", False):
        # warp-specialized kernels ask Triton's allocator for a global scratch buffer at launch
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _descriptor.allocator_set = True  # type: ignore[attr-defined]
    return TensorDescriptor.from_tensor(t, block)


def _launch_options(tiles: GemmTiles, device: torch.device) -> tuple[bool, dict[str, object]]:
    """(PDL on, Triton launch options) of a GEMM launch with `tiles` on `device`."""
    pdl = pdl_enabled(device)
    return pdl, {"num_stages": tiles.stages, "num_warps": tiles.warps, "launch_pdl": pdl}


def gate_up_silu(
    x: torch.Tensor, gate_up_weight: torch.Tensor, tiles: GemmTiles = TILES.gate_up
) -> torch.Tensor:
    """silu(x Wg^T) * (x Wu^T) [M, I] in x's dtype, from fp32 accumulators (gate_up_weight [2I, H] =
    [Wg; Wu]). Needs `fused_mlp_applies`-sized operands, contiguous, on one device."""
    num_rows, hidden = x.shape
    intermediate = gate_up_weight.shape[0] // 2
    if tiles.split != 1 or not tiles.fits(intermediate, hidden):
        raise ValueError(
            f"gate_up {tuple(gate_up_weight.shape)} / x {tuple(x.shape)} do not fit tiles {tiles}"
        )
    act = torch.empty(num_rows, intermediate, dtype=x.dtype, device=x.device)
    grid = (intermediate // tiles.bn, (num_rows + _BM - 1) // _BM)
    pdl, launch = _launch_options(tiles, x.device)
    ws = tiles.warp_specialize
    with torch.cuda.device(x.device):
        if tiles.tma:
            _kernel("gate_up_tma")[grid](  # type: ignore[index]
                _descriptor(x, [_BM, tiles.bk], ws), _descriptor(gate_up_weight, [tiles.bn, tiles.bk], ws), act,
                num_rows, hidden, intermediate, act.stride(0), BM=_BM, BN=tiles.bn, BK=tiles.bk, PDL=pdl,
                WS=ws, **launch,
            )  # fmt: skip
        else:
            _kernel("gate_up")[grid](  # type: ignore[index]
                x, gate_up_weight, act, num_rows, hidden, intermediate, x.stride(0), gate_up_weight.stride(0),
                act.stride(0), BM=_BM, BN=tiles.bn, BK=tiles.bk, PDL=pdl, **launch,
            )  # fmt: skip
    return act


def linear_partials(x: torch.Tensor, weight: torch.Tensor, tiles: GemmTiles) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T as `tiles.split` fp32 partial sums [S, M, N] (split-K without its
    reduction: the consumer, add_partials_rmsnorm, sums them). Needs tiles.fits(N, K), contiguous operands."""
    num_rows, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or not tiles.fits(n, k):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)} in tiles {tiles}")
    if not (x.is_contiguous() and weight.is_contiguous()):
        raise ValueError("linear_partials needs contiguous operands")
    partials = torch.empty(tiles.split, num_rows, n, dtype=torch.float32, device=x.device)
    grid = (n // tiles.bn, (num_rows + _BM - 1) // _BM, tiles.split)
    pdl, launch = _launch_options(tiles, x.device)
    ws = tiles.warp_specialize
    with torch.cuda.device(x.device):
        if tiles.tma:
            _kernel("partials_tma")[grid](  # type: ignore[index]
                _descriptor(x, [_BM, tiles.bk], ws), _descriptor(weight, [tiles.bn, tiles.bk], ws), partials, num_rows,
                k, partials.stride(0), partials.stride(1), BM=_BM, BN=tiles.bn, BK=tiles.bk, SPLIT=tiles.split,
                PDL=pdl, WS=ws, **launch,
            )  # fmt: skip
        else:
            _kernel("partials")[grid](  # type: ignore[index]
                x, weight, partials, num_rows, k, x.stride(0), weight.stride(0), partials.stride(0),
                partials.stride(1), BM=_BM, BN=tiles.bn, BK=tiles.bk, SPLIT=tiles.split, PDL=pdl, **launch,
            )  # fmt: skip
    return partials


def mlp_partials(
    x: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    tiles: ShortStepTiles = TILES,
) -> torch.Tensor:
    """The MLP of x [M, H] without its final reduction: fp32 partial sums [S, M, H] whose sum over S is
    silu(x Wg^T) * (x Wu^T) Wd^T (gate_up_weight [2I, H] = [Wg; Wu], down_weight [H, I]). Needs
    `fused_mlp_applies`; all operands contiguous on one device."""
    hidden = x.shape[1]
    intermediate = down_weight.shape[1]
    if gate_up_weight.shape != (2 * intermediate, hidden) or down_weight.shape != (hidden, intermediate):
        raise ValueError(
            f"weights {tuple(gate_up_weight.shape)} / {tuple(down_weight.shape)} do not fit x {tuple(x.shape)}"
        )
    if not (x.is_contiguous() and gate_up_weight.is_contiguous() and down_weight.is_contiguous()):
        raise ValueError("the fused MLP needs contiguous operands")
    return linear_partials(gate_up_silu(x, gate_up_weight, tiles.gate_up), down_weight, tiles.down)


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
