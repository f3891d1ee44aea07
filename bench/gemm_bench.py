"""The cached step's GEMMs alone: each Llama-3-8B projection at a few-row M, per BLAS library.

    PYTHONPATH=. python3 bench/gemm_bench.py --out $OUT/gemm.json

The 100-over-10k step reads 15 GB of weights through GEMMs with M = 128 rows (the extend graph's
bucket); run 9's profile put them at 6.1 ms against a 5.0 ms copy-rate floor on an H100. Here each shape
runs for 32 layers of distinct weights (beyond L2, as in the model), captured in one CUDA graph, with
cuBLAS and with cuBLASLt (`torch.backends.cuda.preferred_blas_library`), and is reported as ms per 32
layers and as a fraction of the device-to-device copy rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.gpu_timing import copy_tbps, run_metadata, time_ms

HIDDEN, INTERMEDIATE, Q, KV = 4096, 14336, 4096, 1024
SHAPES = {  # name: (out features, in features)
    "qkv": (Q + 2 * KV, HIDDEN),
    "o": (HIDDEN, Q),
    "gate_up": (2 * INTERMEDIATE, HIDDEN),
    "down": (HIDDEN, INTERMEDIATE),
}
LAYERS = 32


def time_shape(rows: int, weights: list[torch.Tensor]) -> float:
    x = torch.randn((rows, weights[0].shape[1]), dtype=torch.bfloat16, device="cuda")
    for w in weights:  # load the kernels outside the capture
        F.linear(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            F.linear(x, w)
    return time_ms(graph.replay, warmup=3, reps=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="*", default=[100, 128, 256])
    parser.add_argument("--libraries", nargs="*", default=["cublas", "cublaslt"])
    args = parser.parse_args()
    tbps = copy_tbps()
    report: dict[str, object] = {"meta": run_metadata(), "copy_TBps": round(tbps, 3), "results": {}}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (out_f, in_f) in SHAPES.items():
        weights = [
            torch.empty((out_f, in_f), dtype=torch.bfloat16, device="cuda").normal_(0, 0.02, generator=gen)
            for _ in range(LAYERS)
        ]
        floor_ms = LAYERS * out_f * in_f * 2 / (tbps * 1e12) * 1e3
        for library in args.libraries:
            torch.backends.cuda.preferred_blas_library(library)
            for rows in args.rows:
                ms = time_shape(rows, weights)
                entry = {
                    "ms_32_layers": round(ms, 4),
                    "floor_ms": round(floor_ms, 4),
                    "of_copy_rate": round(floor_ms / ms, 3),
                }
                report["results"][f"{name}/{library}/M{rows}"] = entry  # type: ignore[index]
                print(name, library, rows, entry, flush=True)
        del weights
    torch.backends.cuda.preferred_blas_library("cublas")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
