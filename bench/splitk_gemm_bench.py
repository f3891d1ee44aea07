"""Can a Triton split-K GEMM beat cuBLAS on the cached step's 128-row projections?

    PYTHONPATH=. python3 bench/splitk_gemm_bench.py --out bench/results/splitk_gemm.json

The cached 100-over-10,000 step (padded to 128 rows) spends 4.5 ms in four GEMM shapes per layer; the
ones with few output tiles (o: N 4096, qkv: N 6144, down: N 4096 over K 14336) read their weights at
57-73% of the copy rate (bench/results/gpu_notes.md runs 57, 60). Here each shape runs as 32 GEMMs over 32
distinct weights (as the 32 layers do) inside one CUDA graph, for torch (cuBLAS) and for a sweep of Triton
split-K configurations (fp32 partial sums [S, M, N], the reduction left to the consumer kernel, which
would fold it in). Reported: us per GEMM, and the reduction's own cost for the best configuration.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from bench.gpu_timing import copy_tbps, graph_us, run_metadata

M = 128
LAYERS = 32
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@triton.jit
def splitk_kernel(
    x_ptr, w_ptr, out_ptr, K, stride_xm, stride_wn, stride_os, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    k_per = K // SPLIT
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_s * k_per + tl.arange(0, BK)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, k_per, BK):
        a = tl.load(x_ptrs)
        b = tl.load(w_ptrs)
        acc = tl.dot(a, tl.trans(b), acc)
        x_ptrs += BK
        w_ptrs += BK
    out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty))


@triton.jit
def splitk_tma_kernel(
    x_desc, w_desc, out_ptr, K, stride_os, stride_om,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    k_per = K // SPLIT
    k0 = pid_s * k_per
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, k_per, BK):
        a = x_desc.load([pid_m * BM, k0 + k])
        b = w_desc.load([pid_n * BN, k0 + k])
        acc = tl.dot(a, b.T, acc)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty))


@triton.jit
def reduce_kernel(part_ptr, out_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + s * MN + offs)
    tl.store(out_ptr + offs, acc.to(tl.bfloat16))


def configs(n: int, k: int) -> list[tuple[int, int, int, int, int, int]]:
    """(BM, BN, BK, SPLIT, stages, warps) with 120-600 CTAs that fit shared memory."""
    out = []
    for bm, bn, bk, split, stages in itertools.product(
        (64, 128), (32, 64, 128), (64, 128), (1, 2, 4, 7, 8, 16), (3, 4)
    ):
        ctas = (M // bm) * (n // bn) * split
        smem = stages * (bm + bn) * bk * 2
        if k % (split * bk) or not 120 <= ctas <= 600 or smem > 200 * 1024 or bm * bn < 64 * 64:
            continue
        out.append((bm, bn, bk, split, stages, 8 if bm * bn >= 128 * 128 else 4))
    return out


def measured(
    cfg: tuple[int, ...], run: Callable[[Any], None], weights: list[Any], out: torch.Tensor, ref: torch.Tensor
) -> dict[str, Any]:
    """One configuration checked against the reference on the first weight, then timed over all of them;
    a configuration that does not compile or run is reported with its error."""
    try:
        run(weights[0])
        got = out.float().sum(0) if out.dim() == 3 else out.float()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        us = graph_us(lambda: [run(w) for w in weights], LAYERS)
    except Exception as exc:
        return {"config": cfg, "error": str(exc)[:300]}
    return {"config": cfg, "us": us, "rel_err": err}


def shape_figures(name: str, n: int, k: int, use_tma: bool) -> dict[str, Any]:
    x = torch.randn(M, k, dtype=torch.bfloat16, device="cuda")
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(LAYERS)]
    outs = [torch.empty(M, n, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]
    torch_us = graph_us(
        lambda: [torch.nn.functional.linear(x, w, out=o) for w, o in zip(weights, outs, strict=True)], LAYERS
    )
    ref = torch.nn.functional.linear(x, weights[0]).float()
    parts = torch.empty(16 * M * n, dtype=torch.float32, device="cuda")
    results = []
    t0 = time.perf_counter()
    for cfg in configs(n, k):
        split = cfg[3]
        out = parts[: split * M * n].view(split, M, n) if split > 1 else outs[0]

        def run(w: torch.Tensor, out=out, cfg=cfg) -> None:
            bm, bn, bk, split, stages, warps = cfg
            splitk_kernel[(n // bn, M // bm, split)](
                x, w, out, k, x.stride(0), w.stride(0), M * n, n,
                BM=bm, BN=bn, BK=bk, SPLIT=split, num_stages=stages, num_warps=warps,
            )  # fmt: skip

        results.append(measured(cfg, run, weights, out, ref))
    ok = sorted((r for r in results if "us" in r), key=lambda r: r["us"])
    tma = []
    if use_tma and ok:
        from triton.tools.tensor_descriptor import TensorDescriptor

        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        for r in ok[:6]:
            bm, bn, bk, split, _, _ = r["config"]
            out = parts[: split * M * n].view(split, M, n) if split > 1 else outs[0]
            x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
            w_descs = [TensorDescriptor.from_tensor(w, [bn, bk]) for w in weights]

            def run_tma(wd, out=out, cfg=r["config"], x_desc=x_desc) -> None:
                bm, bn, bk, split, stages, warps = cfg
                splitk_tma_kernel[(n // bn, M // bm, split)](
                    x_desc, wd, out, k, M * n, n,
                    BM=bm, BN=bn, BK=bk, SPLIT=split, num_stages=stages, num_warps=warps,
                )  # fmt: skip

            tma.append(measured(r["config"], run_tma, w_descs, out, ref))
    reduce_us = None
    if ok and ok[0]["config"][3] > 1:
        split = ok[0]["config"][3]
        p = parts[: split * M * n]
        block = 1024
        reduce_us = graph_us(
            lambda: [reduce_kernel[(M * n // block,)](p, o, M * n, SPLIT=split, BLOCK=block) for o in outs],
            LAYERS,
        )
    weight_mb = n * k * 2 / 1e6
    return {
        "n": n,
        "k": k,
        "weight_mb": weight_mb,
        "torch_us": torch_us,
        "torch_tbps": weight_mb / torch_us,
        "best": ok[:8],
        "tma": tma,
        "reduce_us_for_best": reduce_us,
        "configs_tried": len(results),
        "errors": [r for r in results if "error" in r][:3],
        "sweep_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/splitk_gemm.json"))
    parser.add_argument("--shapes", default="o,qkv,down,gate_up")
    parser.add_argument("--no-tma", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"meta": run_metadata(), "triton": triton.__version__, "copy_tbps": copy_tbps()}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        result[name] = shape_figures(name, n, k, not args.no_tma)
        brief = {key: result[name][key] for key in ("torch_us", "reduce_us_for_best", "sweep_s")}
        print(name, brief, result[name]["best"][:2], result[name]["tma"][:2], file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each shape: a timeout keeps some
    return result


if __name__ == "__main__":
    main()
