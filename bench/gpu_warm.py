"""Compile FlashInfer's JIT kernels for the head_dim 128 / bf16 set in parallel processes (one per
kernel family), so a fresh GPU machine pays the longest compile, not the sum.

    PYTHONPATH=. python3 bench/gpu_warm.py
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time

import torch

from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention

SHAPE = AttentionShape(num_qo_heads=32, num_kv_heads=8, head_dim=128, page_size=16)


def _warm(kind: str) -> None:
    start = time.perf_counter()
    if kind in ("prefill", "decode"):
        attn = FlashInferAttention(SHAPE, device="cuda", workspace_bytes=16 << 20)
        attn.warmup((kind,))
    else:
        import flashinfer

        x = torch.randn(64, 4096, dtype=torch.bfloat16, device="cuda")
        w = torch.ones(4096, dtype=torch.bfloat16, device="cuda")
        if kind == "norm":
            flashinfer.rmsnorm(x, w)
        elif kind == "activation":
            flashinfer.silu_and_mul(x)
        elif kind == "rope":
            q = torch.randn(64, 32 * 128, dtype=torch.bfloat16, device="cuda")
            k = torch.randn(64, 8 * 128, dtype=torch.bfloat16, device="cuda")
            cos_sin = torch.randn(4096, 128, dtype=torch.float32, device="cuda")
            pos = torch.arange(64, device="cuda")
            flashinfer.apply_rope_with_cos_sin_cache_inplace(pos, q, k, 128, cos_sin, is_neox=True)
        torch.cuda.synchronize()
    print(f"warm {kind}: {time.perf_counter() - start:.1f} s", flush=True)


def main(kinds: list[str]) -> int:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_warm, args=(kind,)) for kind in kinds]
    start = time.perf_counter()
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    print(f"warm all ({', '.join(kinds)}): {time.perf_counter() - start:.1f} s", flush=True)
    return max(abs(proc.exitcode or 0) for proc in procs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["prefill", "decode", "norm", "activation", "rope"]))
