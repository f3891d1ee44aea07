"""GPU kernel figures for issue 7, in one call: ceilings, decode attention on the IPC-mapped pool against
a local pool, and paged prefill attention.

    PYTHONPATH=. python3 bench/gpu_kernels.py --out bench/results/gpu_kernels.json

Prints one JSON object (also written to --out). Each target sits beside its ceiling under stable keys:
  ceilings.matmul_bf16_tflops, ceilings.copy_tbps
  decode_attention.{ipc_tbps, local_tbps, ipc_fraction_of_copy, local_over_ipc}
  prefill_attention.{tflops}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.gpu_timing import IpcPoolOwner, copy_tbps, matmul_tflops, run_metadata, time_ms
from computeworker.model.attention_flashinfer import AttentionShape, FlashInferAttention
from computeworker.model.batch import ForwardBatch
from shared.kv_layout import KVLayout

PAGE = 16
HEADS, KV_HEADS, DIM = 32, 8, 128


def decode_batch(num_seqs: int, kv_len: int, num_pages: int, seed: int = 0) -> ForwardBatch:
    """`num_seqs` sequences of `kv_len` tokens each on a random permutation of pool pages (a radix cache
    scatters pages), each adding its last token."""
    pages_per_seq = (kv_len + PAGE - 1) // PAGE
    gen = torch.Generator().manual_seed(seed)
    page_ids = torch.randperm(num_pages, generator=gen)[: num_seqs * pages_per_seq].to(torch.int32)
    last_pages = page_ids.view(num_seqs, pages_per_seq)[:, -1].long()
    last_len = kv_len - (pages_per_seq - 1) * PAGE
    dev = "cuda"
    return ForwardBatch(
        input_ids=torch.zeros(num_seqs, dtype=torch.int64, device=dev),
        positions=torch.full((num_seqs,), kv_len - 1, dtype=torch.int64, device=dev),
        qo_indptr=torch.arange(num_seqs + 1, dtype=torch.int32, device=dev),
        kv_indptr=torch.arange(0, num_seqs * pages_per_seq + 1, pages_per_seq, dtype=torch.int32, device=dev),
        kv_page_ids=page_ids.to(dev),
        kv_last_page_len=torch.full((num_seqs,), last_len, dtype=torch.int32, device=dev),
        write_page_ids=last_pages.to(dev),
        write_slots=torch.full((num_seqs,), last_len - 1, dtype=torch.int64, device=dev),
        q_lens=(1,) * num_seqs,
        kv_lens=(kv_len,) * num_seqs,
    )


def decode_attention(copy_ceiling_tbps: float, num_seqs: int = 64, kv_len: int = 8192) -> dict[str, float]:
    """One layer's decode attention (K/V write + tensor-core decode kernel) over a pool mapped through
    CUDA IPC from another process, and over a torch-allocated pool with the same contents."""
    num_pages = num_seqs * kv_len // PAGE + 64
    layout = KVLayout(1, num_pages, PAGE, KV_HEADS, DIM, "bfloat16")
    attn = FlashInferAttention(AttentionShape(HEADS, KV_HEADS, DIM, PAGE), device="cuda")
    batch = decode_batch(num_seqs, kv_len, num_pages)
    q = torch.randn((num_seqs, HEADS, DIM), dtype=torch.bfloat16, device="cuda")
    k = torch.randn((num_seqs, KV_HEADS, DIM), dtype=torch.bfloat16, device="cuda")
    kv_bytes = num_seqs * kv_len * KV_HEADS * DIM * 2 * 2  # K and V, bf16: what the kernel must read

    local = torch.randn(layout.shape, dtype=torch.bfloat16, device="cuda")
    attn.begin(batch)
    local_ms = time_ms(lambda: attn.forward(0, q, k, k, local[0]), warmup=5, reps=15, inner=20)

    from shared.pool import map_pool

    owner = IpcPoolOwner(layout)
    mapped = map_pool(owner.descriptor)
    try:
        mapped.tensor.copy_(local)
        torch.cuda.synchronize()
        ipc_ms = time_ms(lambda: attn.forward(0, q, k, k, mapped.tensor[0]), warmup=5, reps=15, inner=20)
        # The attention kernel alone (no K/V write, no launch of the two index copies).
        kernel_ms = time_ms(lambda: attn._decode.run(q, mapped.tensor[0]), warmup=5, reps=15, inner=20)
        # The same kernel once more on the local pool, so drift between the two runs shows.
        local_ms_again = time_ms(lambda: attn.forward(0, q, k, k, local[0]), warmup=5, reps=15, inner=20)
    finally:
        mapped.close()
        owner.close()
    ipc_tbps = kv_bytes / (ipc_ms * 1e-3) / 1e12
    local_tbps = kv_bytes / (min(local_ms, local_ms_again) * 1e-3) / 1e12
    return {
        "num_seqs": num_seqs,
        "kv_len": kv_len,
        "kv_bytes": kv_bytes,
        "ipc_ms": ipc_ms,
        "local_ms": local_ms,
        "local_ms_again": local_ms_again,
        "ipc_tbps": ipc_tbps,
        "ipc_kernel_only_ms": kernel_ms,
        "ipc_kernel_only_tbps": kv_bytes / (kernel_ms * 1e-3) / 1e12,
        "local_tbps": local_tbps,
        "copy_tbps_ceiling": copy_ceiling_tbps,
        "ipc_fraction_of_copy": ipc_tbps / copy_ceiling_tbps,
        "target_ipc_fraction_of_copy": 0.90,
        "local_over_ipc": local_tbps / ipc_tbps,
        "target_local_over_ipc_max": 1.02,
        "decode_tensor_cores": attn.decode_tensor_cores,
    }


def prefill_attention(q_len: int = 8192) -> dict[str, float]:
    """One layer's cold causal prefill attention over `q_len` tokens through the paged prefill kernel."""
    pages = (q_len + PAGE - 1) // PAGE
    attn = FlashInferAttention(AttentionShape(HEADS, KV_HEADS, DIM, PAGE), device="cuda")
    pool = torch.randn((pages + 8, 2, PAGE, KV_HEADS, DIM), dtype=torch.bfloat16, device="cuda")
    positions = torch.arange(q_len, device="cuda")
    batch = ForwardBatch(
        input_ids=torch.zeros(q_len, dtype=torch.int64, device="cuda"),
        positions=positions,
        qo_indptr=torch.tensor([0, q_len], dtype=torch.int32, device="cuda"),
        kv_indptr=torch.tensor([0, pages], dtype=torch.int32, device="cuda"),
        kv_page_ids=torch.arange(pages, dtype=torch.int32, device="cuda"),
        kv_last_page_len=torch.tensor([q_len - (pages - 1) * PAGE], dtype=torch.int32, device="cuda"),
        write_page_ids=positions // PAGE,
        write_slots=positions % PAGE,
        q_lens=(q_len,),
        kv_lens=(q_len,),
    )
    q = torch.randn((q_len, HEADS, DIM), dtype=torch.bfloat16, device="cuda")
    k = torch.randn((q_len, KV_HEADS, DIM), dtype=torch.bfloat16, device="cuda")
    attn.begin(batch)
    ms = time_ms(lambda: attn.forward(0, q, k, k, pool), warmup=3, reps=20)
    flops = 2 * 2 * HEADS * DIM * q_len * (q_len + 1) / 2  # QK^T and PV over the causal triangle
    return {"q_len": q_len, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "backend": attn.prefill_backend}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_kernels.json"))
    args = parser.parse_args(argv)
    result: dict[str, object] = {"meta": run_metadata()}
    ceilings = {"matmul_bf16_tflops": matmul_tflops(), "copy_tbps": copy_tbps()}
    result["ceilings"] = ceilings
    print(json.dumps({"ceilings": ceilings}), file=sys.stderr, flush=True)
    result["decode_attention"] = decode_attention(ceilings["copy_tbps"])
    print(json.dumps({"decode_attention": result["decode_attention"]}), file=sys.stderr, flush=True)
    result["prefill_attention"] = prefill_attention()
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
