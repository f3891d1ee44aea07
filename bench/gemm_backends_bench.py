"""The cached step's GEMMs at M = 128 through torch's F.linear against FlashInfer's mm_bf16 backends.

    PYTHONPATH=. python3 bench/gemm_backends_bench.py --out $OUT/gemm_backends.json

Llama-3-8B shapes (qkv 4096 -> 6144, o 4096 -> 4096, gate_up 4096 -> 28672, down 14336 -> 4096), 32 layers
of distinct weights (beyond L2, as in the model), each variant's 32 calls captured in one CUDA graph; the
figure is the replay's median (device events) and the weight bytes read per second against the copy rate.
Variants: torch (F.linear: cuBLAS's heuristic pick, what the model runs), cublaslt (FlashInfer's cuBLASLt
runner, autotuned over cuBLASLt's heuristic candidates before the capture), tinygemm (FlashInfer's small-M
kernel, where it supports the shape). Each variant's output is checked against torch's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.gpu_timing import copy_tbps, run_metadata, time_ms

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
LAYERS = 32


def graph_of(fn: Any) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fn()
    return graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--variants", nargs="*", default=["torch", "cublaslt", "tinygemm"])
    args = parser.parse_args()
    import flashinfer
    from flashinfer.autotuner import autotune

    copy = copy_tbps()
    report: dict[str, Any] = {"meta": run_metadata(), "copy_tbps": copy, "rows": args.rows, "kinds": {}}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for kind, (k, n) in SHAPES.items():
        weights = [
            torch.randn((n, k), dtype=torch.bfloat16, device="cuda", generator=gen) * 0.02
            for _ in range(LAYERS)
        ]
        x = torch.randn((args.rows, k), dtype=torch.bfloat16, device="cuda", generator=gen)
        outs = [torch.empty((args.rows, n), dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]
        nbytes = LAYERS * n * k * 2
        reference = F.linear(x, weights[-1])
        figures: dict[str, Any] = {}
        for variant in args.variants:
            try:
                if variant == "torch":

                    def run(ws=weights, x=x, outs=outs) -> None:
                        for i, w in enumerate(ws):
                            torch.matmul(x, w.t(), out=outs[i])

                else:

                    def run(ws=weights, x=x, outs=outs, backend=variant) -> None:
                        for i, w in enumerate(ws):
                            flashinfer.mm_bf16(x, w.t(), out=outs[i], backend=backend)

                    with autotune(True):
                        run()
                torch.cuda.synchronize()
                graph = graph_of(run)
                ms = time_ms(graph.replay, warmup=3, reps=20)
                graph.replay()
                torch.cuda.synchronize()
                err = float((outs[-1].float() - reference.float()).abs().max())
                figures[variant] = {
                    "ms_32_layers": round(ms, 4),
                    "fraction_of_copy": round(nbytes / (ms * 1e-3) / (copy * 1e12), 3),
                    "max_abs_diff_vs_torch": err,
                }
            except Exception as exc:  # a backend that does not take the shape on this GPU
                figures[variant] = {"error": repr(exc)[:300]}
            print(kind, variant, figures[variant], flush=True)
        report["kinds"][kind] = figures
        del weights
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
