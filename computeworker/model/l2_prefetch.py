"""Asking the GPU to pull a weight matrix into L2 ahead of the GEMM that reads it.

A cached step's prefill over a long prefix spends ~40 us a layer in attention that is bound by the tensor
cores, not by memory (bench/results/gpu_notes.md run 57), and then runs the output projection, a GEMM of
128 rows that streams its 32 MiB of weights from HBM at ~60% of the copy rate. Issued beside attention, a
bulk L2 prefetch (Hopper's `cp.async.bulk.prefetch.L2`, carried out by the copy engine in each SM's TMA
unit; the threads that issue it exit at once) moves those weights while HBM is otherwise idle, so the
projection reads them from L2.

One Triton program per 128 prefetches of 16 KiB; the byte count is rounded down to whole 16 KiB blocks
(a prefetch is a hint: the tail is read from HBM as before). `evict_last` tags the lines with the L2
evict-last policy so attention's K/V stream does not push them out first.
"""

from __future__ import annotations

import torch

BLOCK_BYTES = 16 * 1024  # one cp.async.bulk.prefetch per thread; a multiple of 16 as the instruction needs
_THREADS = 128
_kernels: dict[bool, object] = {}

_PLAIN = """{
  .reg .pred p;
  setp.ne.b32 p, $2, 0;
  @p cp.async.bulk.prefetch.L2.global [$1], 16384;
  mov.u32 $0, 0;
}"""
_EVICT_LAST = """{
  .reg .pred p;
  .reg .b64 policy;
  setp.ne.b32 p, $2, 0;
  createpolicy.fractional.L2::evict_last.b64 policy, 1.0;
  @p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], 16384, policy;
  mov.u32 $0, 0;
}"""


def _build_kernel(evict_last: bool) -> object:  # pragma: no cover - needs triton and a Hopper GPU
    import triton
    import triton.language as tl

    asm = _EVICT_LAST if evict_last else _PLAIN

    @triton.jit
    def prefetch_kernel(base_addr, num_blocks, sink, THREADS: tl.constexpr, ASM: tl.constexpr):
        block = tl.program_id(0) * THREADS + tl.arange(0, THREADS)
        live = block < num_blocks
        addr = base_addr + block.to(tl.int64) * 16384
        done = tl.inline_asm_elementwise(
            ASM, "=r,l,r", [addr, live.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1
        )
        tl.store(sink + tl.arange(0, THREADS), done, mask=block < 0)  # never stores; keeps the asm

    return lambda grid, *args: prefetch_kernel[grid](*args, THREADS=_THREADS, ASM=asm)


def prefetch_to_l2(tensor: torch.Tensor, num_bytes: int | None = None, *, evict_last: bool = True) -> None:
    """Queue, on the current stream, an L2 prefetch of the first `num_bytes` (default: all) of the
    contiguous CUDA `tensor`, rounded down to whole 16 KiB blocks. Returns when the requests are issued,
    not when the data has arrived. Needs an sm_90+ GPU."""
    if not tensor.is_cuda or not tensor.is_contiguous():
        raise ValueError("prefetch_to_l2 needs a contiguous CUDA tensor")
    size = tensor.numel() * tensor.element_size()
    num_blocks = min(size, size if num_bytes is None else max(num_bytes, 0)) // BLOCK_BYTES
    if num_blocks == 0:
        return
    kernel = _kernels.get(evict_last)
    if kernel is None:
        kernel = _kernels[evict_last] = _build_kernel(evict_last)
    sink = _sink(tensor.device)
    grid = ((num_blocks + _THREADS - 1) // _THREADS,)
    with torch.cuda.device(tensor.device):
        kernel(grid, tensor.data_ptr(), num_blocks, sink)  # type: ignore[operator]


_sinks: dict[torch.device, torch.Tensor] = {}


def _sink(device: torch.device) -> torch.Tensor:
    sink = _sinks.get(device)
    if sink is None:
        sink = _sinks[device] = torch.empty(_THREADS, dtype=torch.int32, device=device)
    return sink
